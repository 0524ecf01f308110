"""cffi build script: compiles csrc/walsync.c (the VFS) with xxh3.c, commits.c (the
consumer's per-batch work) and objectfile.c (the local-directory store's put) into
``walsync_vfs._shim``.

The result is one shared object that is both a CPython extension (so Python calls the
consumer API directly) and a SQLite loadable extension (entry ``sqlite3_walsync_init``),
loaded into apsw's private SQLite with ``load_extension``.  The dynamic loader maps one
path once, so both sides share the same globals: the record queue the shim fills is the
one Python drains.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
typedef struct ws_rec ws_rec;
struct ws_rec {
  ws_rec *next;
  int64_t db_id;
  int32_t kind;
  uint32_t page_size;
  uint64_t seq;
  int64_t time_ns;
  uint32_t db_size;
  uint32_t npages;
  uint32_t salt1, salt2;
  uint32_t frame_start, frame_end;
  uint32_t *pgnos;
  unsigned char **pages;
  int32_t spool_fd;
  uint32_t *frames;
  char *path;
  ...;
};
typedef struct ws_batch ws_batch;
struct ws_batch {
  ws_batch *next;
  int64_t db_id;
  uint32_t nrec, ncommit, ngap;
  ws_rec *first;
  const char *open_path;
  uint32_t max_db_size;
  ...;
};
ws_batch *ws_drain(int timeout_ms, int linger_us);
void ws_wake(void);
typedef struct ws_pos { uint64_t seq; uint32_t page_size, nframe, salt1, salt2; } ws_pos;
int ws_sync(int64_t db_id, ws_pos *out);
void ws_hold(int64_t db_id, int delta);
int ws_read(void *file, void *buf, int n, int64_t off);
int64_t ws_file_size(void *file);
int ws_release_heap(void);
void ws_spool_big(int64_t db_id, int64_t nbytes, const char *dir);
int ws_tail(int64_t db_id);
int ws_role(int64_t db_id, int role, const char *addr);
int ws_leader(int64_t db_id, int64_t *leader_db_id, char *addr);
void ws_beat(int64_t db_id);
void ws_read_any(int64_t db_id);
void ws_on_open(void (*cb)(void));
int ws_open_count(void);
int ws_app_open(int64_t id);
int ws_app_nolock(int64_t id);
int ws_app_writable(int64_t id);
int64_t ws_app_exclusive_ns(int64_t id);
int64_t ws_app_locked_ns(int64_t id);
int ws_wal_orphaned(int64_t id);
void *ws_conn_open(const char *path, int busy_ms, char *err, int nerr);
int ws_conn_query(void *db, const char *sql, char *out, int nout);
int ws_conn_fcntl(void *db, int op, void *arg);
int ws_conn_in_txn(void *db);
void ws_conn_close(void *db);
typedef struct ws_block ws_block;
struct ws_block {
  ws_block *next;
  uint64_t capacity;
  uint64_t used;
};
typedef struct ws_run ws_run;
struct ws_run {
  ws_run *next;
  int32_t sealed;
  uint32_t page_size;
  uint32_t ncommit;
  uint64_t pages;
  uint64_t first_txid, last_txid;
  int64_t first_time_ns;
  uint64_t last_seq;
  uint32_t salt1, salt2, wal_end;
  unsigned char *entries;
  uint64_t entries_cap;
  ws_block *blocks, *last_block;
  uint64_t first_block;
};
void ws_run_free(ws_run *run);
void ws_run_memory_free(unsigned char *entries, ws_block *blocks);
void ws_blocks_release(void);
#define WS_IN_N ...
#define WS_OUT_N ...
void ws_extend_all(uint32_t n, ws_rec **first, ws_run **open, uint64_t **hashes,
                   const uint64_t *in, int64_t *times, uint64_t *out, ws_rec **next,
                   ws_run **began);
uint64_t ws_page_hash(const unsigned char *page, uint32_t n, uint64_t pgno);
void ws_wal_checksum(int big_end, const unsigned char *a, int n, uint32_t *ck);
uint64_t ws_run_hash(const unsigned char *pages, uint32_t page_size, uint64_t n, uint64_t pgno);
#define WS_PUT_CREATE ...
#define WS_PUT_WRITE ...
#define WS_PUT_NAME ...
#define WS_PUT_DIR ...
int ws_put_file(const char *zTmp, const char *zPath, const char *zDir, const unsigned char *a,
                size_t n, int bCreateOnly, int *pStage);
"""

SOURCES = ("walsync.c", "xxh3.c", "commits.c", "objectfile.c")
ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "walsync_vfs._shim",
    "".join(f'#include "{name}"\n' for name in SOURCES),
    include_dirs=[str(HERE)],
    depends=[str(HERE / name) for name in SOURCES],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
