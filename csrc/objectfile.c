/*
** objectfile.c -- the local-directory store's put of a whole object, in one
** call.
**
** A put is a handful of system calls (create the temp file, write, fsync,
** close, link or rename, unlink, open/fsync/close the directory).  Made one by
** one from Python, each gives up the GIL and takes it back, and every take can
** make an application thread that wants the GIL wait for a wake-up; here they
** are made with the GIL released once.  The object is all-or-nothing across a
** crash: written and fsynced under a temp name, then given its name (a link,
** which fails if the name exists, for a create-only put), then the directory
** fsynced so that the name survives too.
*/
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

/* What failed, for the caller's message and its retry of a missing directory. */
#define WS_PUT_CREATE 1    /* creating the temp file */
#define WS_PUT_WRITE 2     /* writing or fsyncing it */
#define WS_PUT_NAME 3      /* giving it its name */
#define WS_PUT_DIR 4       /* fsyncing the directory: the object has its name */

static int writeAll(int fd, const unsigned char *a, size_t n) {
  while (n > 0) {
    ssize_t done = write(fd, a, n);
    if (done < 0 && errno == EINTR) continue;
    if (done <= 0) return done < 0 ? errno : EIO;
    a += done;
    n -= (size_t)done;
  }
  return 0;
}

static int fsyncDir(const char *zDir) {
  int fd = open(zDir, O_RDONLY | O_DIRECTORY | O_CLOEXEC), rc = 0;
  if (fd < 0) return errno;
  if (fsync(fd)) rc = errno;
  close(fd);
  return rc;
}

/* Write the n bytes at a to the new file zTmp, fsync it, give it the name zPath
** (link if bCreateOnly, else rename) and fsync zDir, the directory of both.
** Returns 0, or an errno with *pStage saying which step failed; the temp file
** is gone either way. */
int ws_put_file(const char *zTmp, const char *zPath, const char *zDir, const unsigned char *a, size_t n,
                int bCreateOnly, int *pStage) {
  int fd = open(zTmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666), rc;
  if (fd < 0) {
    *pStage = WS_PUT_CREATE;
    return errno;
  }
  rc = writeAll(fd, a, n);
  if (!rc && fsync(fd)) rc = errno;
  if (close(fd) && !rc) rc = errno;
  if (rc) {
    *pStage = WS_PUT_WRITE;
  } else if (bCreateOnly ? link(zTmp, zPath) : rename(zTmp, zPath)) {
    *pStage = WS_PUT_NAME;
    rc = errno;
  }
  if (rc || bCreateOnly) unlink(zTmp);
  if (rc) return rc;
  *pStage = WS_PUT_DIR;
  return fsyncDir(zDir);
}
