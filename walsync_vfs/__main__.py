import sys

from walsync_vfs.cli import main

sys.exit(main())
