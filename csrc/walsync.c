/*
** walsync.c -- a shim VFS that publishes every committed WAL transaction
** exactly once, at the moment SQLite commits it.
**
** Shaped like SQLite's ext/misc/cksumvfs.c: the "walsync" VFS wraps the
** default VFS, the lower sqlite3_file lives right after our WsFile, and every
** method passes straight through.  Only four places do work:
**
**   - xWrite on a "-wal" file copies the WAL header and frame headers into a
**     per-connection mirror of the WAL region written since the last publish
**     (frame headers are rewritten at commit, so nothing is trusted until the
**     commit is complete; page images are not copied);
**   - xShmLock releasing the WAL write lock (lock 0) on the main db file is the
**     moment a transaction is complete and still serialized against every
**     other writer: the frame headers in the mirror are scanned for the
**     commit, and a small record naming its frames is queued *before* the
**     lock is passed down (no page copy, no checksum on the writer's path);
**   - before xWrite at offset 0, xTruncate and xClose of a WAL (a restart, a
**     TRUNCATE checkpoint, the last close, after which SQLite deletes it),
**     the frames of commits still queued are read into their records:
**     committed frames never change before one of those;
**   - xFileControl(SQLITE_FCNTL_COMMIT_PHASETWO) publishes the same way for
**     locking_mode=EXCLUSIVE, where WAL locks are never taken;
**   - xWrite on a main db file outside a checkpoint (CKPT_START..CKPT_DONE)
**     means the database is being changed without the WAL: a GAP is reported.
**
** Published records form one process-wide FIFO that Python drains with
** ws_drain() (see build_shim.py for the declarations).  ws_drain()
** runs on the consumer's thread with the GIL released: it reads each
** commit's frames from the WAL file (one pread, from the page cache),
** verifies their checksum chain, picks the last version of every page, and
** groups the records per database, so the writer pays for none of it.  Per
** database the shim keeps the WAL chain position of the last published
** commit; frames that do not continue that chain (another process or a
** connection not using this VFS wrote) produce a GAP record instead of a
** wrong transaction.  Until Python calls ws_sync() the chain position is
** unknown and nothing is published for that database, because the consumer
** needs a snapshot anyway before deltas mean anything.
*/
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* O_NOATIME */
#endif
#include "sqlite3ext.h"
SQLITE_EXTENSION_INIT1

#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <pthread.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h> /* malloc_trim, for ws_release_heap() */
#endif

#define WS_VFS_NAME "walsync"

/* File control answered by the main db file: *(int64_t*)pArg = db id.  This
** is how Python learns which WsDb a given connection is using. */
#define WS_FCNTL_DB_ID 0x57530001

/* Record kinds, mirrored in walsync_vfs/capture.py. */
#define WS_COMMIT 1 /* one committed transaction */
#define WS_GAP 2    /* the stream for this db is broken here */
#define WS_OPEN 3   /* first connection opened the db; data = path */
#define WS_CLOSE 4  /* last connection closed the db */

#define WAL_HDR 32
/* A lingering consumer reads the frames of queued commits once this many bytes
** of them wait, so a WAL restart rarely finds any left for the writer to read.
** It wakes when that is due at the rate bytes came in, rather than being woken:
** a wake-up from the writer costs the writer a system call, and often its CPU
** to the thread it woke. */
#define WS_READ_AHEAD ((sqlite3_int64)256 << 10)
#define WS_READ_AHEAD_TICK_NS 2000000LL /* the shortest wait, and the first */
#define WS_ENGINE_FIRST_NS 100000000LL /* the longest an application writer lets the engine go first */
#define FRAME_HDR 24

/* Position in the WAL checksum chain after the last published commit.  Only
** touched by the connection holding the WAL write lock (or by ws_sync(),
** whose caller holds it). */
typedef struct WsChain WsChain;
struct WsChain {
  int bKnown;       /* the rest is meaningful */
  int bHdr;         /* the WAL has a valid header */
  int bBigEndCksum; /* checksum words are big-endian (magic 0x377f0683) */
  uint32_t szPage, salt1, salt2;
  uint32_t nFrame;  /* frames up to and including the last commit */
  uint32_t cksum[2];
  uint32_t nTrunc;  /* TRUNCATE checkpoints by our connections since the header */
  /* The wal-index's iChange after the chain's last commit: SQLite steps it at
  ** every commit and keeps it across restarts, so it proves that a WAL nobody
  ** linked to the chain holds every commit since (see catchUp()). */
  int bChange;      /* iChange is known */
  uint32_t iChange;
};

/* One published record; its public part is declared to cffi in build_shim.py. */
typedef struct ws_rec ws_rec;
struct ws_rec {
  ws_rec *next;
  int64_t db_id;
  int32_t kind;
  uint32_t page_size;
  uint64_t seq;       /* per-db record sequence, 1, 2, 3 ... */
  int64_t time_ns;    /* CLOCK_REALTIME at publish */
  uint32_t db_size;   /* pages after commit */
  uint32_t npages;    /* distinct pages in this commit */
  uint32_t salt1, salt2;
  uint32_t frame_start, frame_end; /* WAL frames [start, end) of the commit */
  uint32_t *pgnos;    /* npages, ascending */
  unsigned char **pages; /* npages pointers to page_size bytes each, or NULL: */
  int32_t spool_fd;   /* a commit too big for memory: a file holding a copy of its frames, */
  uint32_t *frames;   /* and the frame there holding each page (else -1 and NULL) */
  char *path;         /* WS_OPEN: the database path */
  /* Below: private to the shim (cffi sees "..."). */
  struct WsDb *pDb;
  WsChain chain;          /* COMMIT: chain state the frames must continue */
  uint32_t endCk[2];      /* COMMIT: checksum stored in its commit frame */
  unsigned char *aFrames; /* COMMIT: its frames (NULL if they could not be read), */
  union WsBlock *pBlock;  /* inside this block, shared with the commits read with it */
  int bRead;              /* COMMIT: the read of its frames was done (by either side) */
  void *pIndex;           /* COMMIT: block holding pgnos and pages */
};

/* The records of one database in one ws_drain(), in publish order. */
typedef struct ws_batch ws_batch;
struct ws_batch {
  ws_batch *next;
  int64_t db_id;
  uint32_t nrec, ncommit, ngap;
  ws_rec *first;
  const char *open_path; /* path of an OPEN record in the batch, else NULL */
  uint32_t max_db_size;  /* the largest db_size of its COMMITs */
  ws_rec *last;
};


/* Per-database state, shared by every connection of this process. */
typedef struct WsDb WsDb;
struct WsDb {
  char *zPath;
  int64_t id;
  int nRef;     /* open main-db handles (gMutex) */
  int nApp;     /* of them, the application's: not ws_conn_open()'s (gMutex) */
  int nAppRw;   /* of those, the ones it can write through (gMutex) */
  int nAppNoLock; /* of those, the ones opened with nolock=1, which SQLite refuses WAL (gMutex) */
  int nExcl[3]; /* of those, the ones holding EXCLUSIVE or a lock (WS_EXCL_*; gMutex) ... */
  int nAppWal;   /* WAL files the application has open (gMutex) ... */
  dev_t walDev;  /* ... and the file the first of them opened */
  ino_t walIno;
  int64_t exclSinceNs[3]; /* ... and since when one of them has (monotonic) */
  uint64_t seq; /* last record seq used (gMutex) */
  int nHold;    /* >0: WAL restarts are refused (a raw snapshot is reading it) */
  WsChain c;
  int nPending; /* COMMITs queued whose frames nobody has read yet (atomic) */
  uint32_t aQueued[3]; /* salts and end frame of the last COMMIT queued (gMutex) */
  int nWaiter;  /* writers in waitConsumed() (gMutex) */
  int nEngWrite; /* engine connections trying for or holding the WAL write lock (gMutex) */
  int walFd;    /* the consumer's descriptor for the WAL, or -1 */
  int bReopen;  /* the WAL may be another file now: reopen walFd (atomic) */
  ws_batch *pBatch; /* ws_drain() scratch: this db's batch being built (in `batch`) */
  ws_batch batch;   /* its storage: a drain makes one batch per database, never allocated */
  ws_rec *pSpare;   /* a recycled record for the next commit (mu), taken from gSpare */
  /* Several processes: see "Host-wide coordination" below. */
  pthread_mutex_t mu;        /* guards c (recursive): ws_tail() runs without the WAL lock */
  volatile unsigned char *pShm; /* this process's wal-index region 0, or NULL */
  int nShm;                  /* connections that have it mapped (mu) */
  struct WsShared *pShared;  /* the host-wide page in <db>-walsync, or NULL */
  int eRole;                 /* WS_ROLE_*: whether this process replicates the db */
  uint32_t own[3];           /* follower: the WAL (salts, end) its last commit left */
  int64_t lastNotify;        /* follower: CLOCK_MONOTONIC ns of its last notification */
  /* Mirror of the WAL region written since the last publish: its extent, the
  ** WAL header if the region starts at 0, and the header of every frame in it
  ** (24 bytes a frame, so a giant transaction costs 0.6% of its size here); page
  ** images are never kept, the consumer reads them back from the WAL.  One per
  ** database, not per WAL handle: only the holder of the WAL write lock writes
  ** the WAL, and a WAL handle opened through a VFS stacked on this one is not
  ** linked to its main-db handle by anything but its name. */
  sqlite3_int64 iStart, nBuf; /* bytes [iStart, iStart+nBuf) of the WAL were written */
  unsigned char aWalHdr[WAL_HDR];
  uint32_t szMirror;  /* page size the frames are indexed by; 0: not known yet */
  uint32_t fBase;     /* frame number of aFh's first entry */
  unsigned char *aFh; /* frame headers from fBase on */
  uint32_t nFh, nFhAlloc; /* entries in use and allocated */
  int bLost;          /* a frame header could not be kept: the publish reports a gap */
  sqlite3_int64 nBig; /* its commits over this many bytes go to a file (0: WS_BIG_DEFAULT) */
  sqlite3_file *pPin; /* a handle of our own on the db, for the read lock below (gMutex) */
  char *zPinName;     /* its name, as SQLite builds filenames */
  int iPin;           /* the read lock (2..4) it holds while frames are unread, or 0 (gMutex) */
  int iLastPin;       /* the one it held last (gMutex) */
};

/* What ws_sync() reports: the last seq, and the WAL holding the state at it. */
typedef struct ws_pos ws_pos;
struct ws_pos {
  uint64_t seq;
  uint32_t page_size; /* 0 if the WAL has no valid header */
  uint32_t nframe;    /* frames up to the last commit */
  uint32_t salt1, salt2;
};

typedef struct WsFile WsFile;
struct WsFile {
  sqlite3_file base;
  sqlite3_file *pReal; /* the lower file, allocated right after this struct */
  int eType;           /* WSF_MAIN, WSF_WAL or WSF_OTHER */
  WsDb *pDb;           /* MAIN and WAL: the database */
  int bInCkpt;         /* MAIN: between CKPT_START and CKPT_DONE */
  int bRestart;        /* MAIN: holds the lock SQLite restarts the WAL under */
  int bShm;            /* MAIN: has the wal-index mapped (counted in nShm) */
  int bApp;            /* MAIN: opened by the application (counted in nApp) */
  int bAppRw;          /* MAIN: ... and writable (counted in nAppRw) */
  int bAppNoLock;      /* MAIN: ... with nolock=1 (counted in nAppNoLock) */
  int eLock;           /* MAIN: the lock level it holds */
  int bExcl[3];        /* MAIN, application's: holds EXCLUSIVE or a lock (WS_EXCL_*, in nExcl) */
  int bAppWal;         /* WAL: the application's (counted in nAppWal) */
  uint32_t aRestart[3]; /* MAIN: salt1, salt2, last frame of the WAL when taken */
  uint32_t shmShared;  /* wal-index locks it holds, one bit per slot */
  uint32_t shmExcl;
  int bEng;            /* MAIN or WAL of an engine's connection: in gEngFiles (set at open) */
  int bEngWrite;       /* MAIN, engine's: wants or holds the WAL write lock (in nEngWrite) */
  WsFile *pNextEng;    /* gEngFiles links (gMutex) */
  WsFile *pPrevEng;
};
#define WSF_OTHER 0
#define WSF_MAIN 1
#define WSF_WAL 2

#define ORIGVFS(p) ((sqlite3_vfs *)((p)->pAppData))

/* Global registry and record queue, guarded by one mutex.  Writers and the
** consumer hold it for a few instructions at a time: spinning a moment beats
** sleeping on it, whose wake-up costs a writer more than the wait. */
#ifdef PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP
static pthread_mutex_t gMutex = PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP;
#define WS_MUTEX_SPINS PTHREAD_MUTEX_ADAPTIVE_NP
#else
static pthread_mutex_t gMutex = PTHREAD_MUTEX_INITIALIZER;
#define WS_MUTEX_SPINS PTHREAD_MUTEX_DEFAULT
#endif
static pthread_cond_t gCond = PTHREAD_COND_INITIALIZER;
static __thread int tEngineOpen = 0; /* ws_conn_open() is opening: not the application */
static WsFile *gEngFiles = 0; /* the engine's open MAIN and WAL files (gMutex) */

/* The engine's file p is closing (gMutex held). */
static void engFileGone(WsFile *p) {
  if (p->pPrevEng) p->pPrevEng->pNextEng = p->pNextEng;
  else if (gEngFiles == p) gEngFiles = p->pNextEng;
  if (p->pNextEng) p->pNextEng->pPrevEng = p->pPrevEng;
  p->pNextEng = p->pPrevEng = 0;
}

static WsDb **gaDb = 0; /* indexed by id-1; never shrinks (ids stay valid) */
static int64_t gnDb = 0, gnDbAlloc = 0;
static ws_rec *gHead = 0, *gTail = 0;
/* Commit records the consumer is done with, kept for writers' next commits:
** a commit then costs no malloc, and the consumer never frees into the arena
** a writer allocates from (each free would take that arena's lock).  At most
** WS_SPARE_MAX are kept; a drain's records past that are freed. */
#define WS_SPARE_MAX 1024
static ws_rec *gSpare = 0;
static int gnSpare = 0;
static int gWaiting = 0, gWake = 0;
/* The consumer lingers (ws_drain); bytes of commits queued since it last read ahead. */
static sqlite3_int64 gUnread = 0;
static ws_rec *gSeen = 0; /* the last queued record readAhead() looked at */

static pthread_cond_t gDone = PTHREAD_COND_INITIALIZER; /* some db's nPending hit 0 */
static pthread_cond_t gEngWrite = PTHREAD_COND_INITIALIZER; /* some db's nEngWrite hit 0 */

void ws_wake(void);

/* ---------------------------------------------------------------- helpers */

static uint32_t get32(const unsigned char *p) {
  return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* CLOCK_REALTIME plus ns, for pthread_cond_timedwait(). */
static struct timespec deadlineIn(int64_t ns) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ns += ts.tv_nsec;
  ts.tv_sec += (time_t)(ns / 1000000000);
  ts.tv_nsec = (long)(ns % 1000000000);
  return ts;
}

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The WAL checksum over pairs of u32 words, native or big-endian as the magic
** says.  One step maps the state (s1, s2) to M(s1, s2) + (x0, x0 + x1), with
** M = [[1, 1], [1, 2]] mod 2^32: a run of k steps from any state is M^k times
** that state plus the same run taken from (0, 0).  This runs over every
** published byte, and one chain of dependent additions is slow, so where SSE2
** is there (every x86-64) a page in host order is summed as eight runs side by
** side, then the runs are joined with M^k. */
static void ckSerial(const unsigned char *a, int n, int swap, uint32_t *s) {
  uint32_t s1 = s[0], s2 = s[1], x0, x1;
  const unsigned char *end = a + n;
  if (!swap) { /* two loops rather than a test per word */
    for (; a < end; a += 8) {
      memcpy(&x0, a, 4);
      memcpy(&x1, a + 4, 4);
      s1 += x0 + s2;
      s2 += x1 + s1;
    }
  } else {
    for (; a < end; a += 8) {
      memcpy(&x0, a, 4);
      memcpy(&x1, a + 4, 4);
      s1 += __builtin_bswap32(x0) + s2;
      s2 += __builtin_bswap32(x1) + s1;
    }
  }
  s[0] = s1;
  s[1] = s2;
}

#ifdef __SSE2__
typedef struct { uint32_t a, b, c, d; } CkMat; /* [[a, b], [c, d]] */

static CkMat ckMatMul(CkMat x, CkMat y) {
  CkMat r = {x.a * y.a + x.b * y.c, x.a * y.b + x.b * y.d, x.c * y.a + x.d * y.c, x.c * y.b + x.d * y.d};
  return r;
}

static CkMat ckMatPow(uint32_t k) {
  CkMat r = {1, 0, 0, 1}, m = {1, 1, 1, 2};
  for (; k; k >>= 1, m = ckMatMul(m, m)) {
    if (k & 1) r = ckMatMul(r, m);
  }
  return r;
}

/* Two steps of four runs lane bytes apart, from p: the first words of the
** runs' two steps in w[0] and w[2], the second words in w[1] and w[3]. */
static inline void ckTranspose(const unsigned char *p, int lane, __m128i w[4]) {
  __m128i r0 = _mm_loadu_si128((const __m128i *)p);
  __m128i r1 = _mm_loadu_si128((const __m128i *)(p + lane));
  __m128i r2 = _mm_loadu_si128((const __m128i *)(p + 2 * lane));
  __m128i r3 = _mm_loadu_si128((const __m128i *)(p + 3 * lane));
  __m128i t0 = _mm_unpacklo_epi32(r0, r1), t1 = _mm_unpacklo_epi32(r2, r3);
  __m128i t2 = _mm_unpackhi_epi32(r0, r1), t3 = _mm_unpackhi_epi32(r2, r3);
  w[0] = _mm_unpacklo_epi64(t0, t1);
  w[1] = _mm_unpackhi_epi64(t0, t1);
  w[2] = _mm_unpacklo_epi64(t2, t3);
  w[3] = _mm_unpackhi_epi64(t2, t3);
}

/* n bytes in host order, n a multiple of 128: eight runs of n / 8 bytes, two
** groups of four (one per 32-bit lane), each group's chains independent. */
static void ckLanes(const unsigned char *a, int n, uint32_t *s) {
  int lane = n / 8, off, k;
  __m128i p1 = _mm_setzero_si128(), p2 = p1, q1 = p1, q2 = p1, w[4], v[4];
  uint32_t x1[8], x2[8], s1 = s[0], s2 = s[1];
  CkMat m;
  for (off = 0; off < lane; off += 16) {
    ckTranspose(a + off, lane, w);
    ckTranspose(a + 4 * lane + off, lane, v);
    p1 = _mm_add_epi32(p1, _mm_add_epi32(w[0], p2));
    q1 = _mm_add_epi32(q1, _mm_add_epi32(v[0], q2));
    p2 = _mm_add_epi32(p2, _mm_add_epi32(w[1], p1));
    q2 = _mm_add_epi32(q2, _mm_add_epi32(v[1], q1));
    p1 = _mm_add_epi32(p1, _mm_add_epi32(w[2], p2));
    q1 = _mm_add_epi32(q1, _mm_add_epi32(v[2], q2));
    p2 = _mm_add_epi32(p2, _mm_add_epi32(w[3], p1));
    q2 = _mm_add_epi32(q2, _mm_add_epi32(v[3], q1));
  }
  _mm_storeu_si128((__m128i *)x1, p1);
  _mm_storeu_si128((__m128i *)(x1 + 4), q1);
  _mm_storeu_si128((__m128i *)x2, p2);
  _mm_storeu_si128((__m128i *)(x2 + 4), q2);
  m = ckMatPow((uint32_t)lane / 8);
  for (k = 0; k < 8; k++) {
    uint32_t t1 = m.a * s1 + m.b * s2 + x1[k];
    s2 = m.c * s1 + m.d * s2 + x2[k];
    s1 = t1;
  }
  s[0] = s1;
  s[1] = s2;
}
#endif

static void walCksum(int bigEnd, const unsigned char *a, int n, const uint32_t *in, uint32_t *out) {
  uint32_t s[2] = {in[0], in[1]};
  int swap = bigEnd != (*(const unsigned char *)&(uint16_t){1} == 0);
#ifdef __SSE2__
  if (!swap && n % 128 == 0) ckLanes(a, n, s);
  else
#endif
    ckSerial(a, n, swap, s);
  out[0] = s[0];
  out[1] = s[1];
}

/* For tests: the checksum of n bytes (a multiple of 8) continuing from ck. */
void ws_wal_checksum(int big_end, const unsigned char *a, int n, uint32_t *ck) {
  walCksum(big_end, a, n, ck, ck);
}

/* Parse a 32-byte WAL header into the chain-start state of pDb. */
static int parseWalHeader(WsChain *pC, const unsigned char *h) {
  uint32_t magic = get32(h), sz = get32(h + 8), ck[2], zero[2] = {0, 0};
  if ((magic & 0xFFFFFFFE) != 0x377f0682 || get32(h + 4) != 3007000) return 0;
  if (sz == 1) sz = 65536;
  if (sz < 512 || sz > 65536 || (sz & (sz - 1))) return 0;
  walCksum(magic & 1, h, 24, zero, ck);
  if (ck[0] != get32(h + 24) || ck[1] != get32(h + 28)) return 0;
  pC->bHdr = 1;
  pC->bBigEndCksum = magic & 1;
  pC->szPage = sz;
  pC->salt1 = get32(h + 16);
  pC->salt2 = get32(h + 20);
  pC->cksum[0] = ck[0];
  pC->cksum[1] = ck[1];
  pC->nFrame = 0;
  pC->nTrunc = 0;
  return 1;
}

/* Does frame header h (followed by its page) continue the chain in ck?  On
** success ck is advanced to this frame's checksum. */
static int frameValid(const WsChain *pC, const unsigned char *h, uint32_t *ck) {
  uint32_t c[2];
  if (get32(h + 8) != pC->salt1 || get32(h + 12) != pC->salt2 || get32(h) == 0) return 0;
  walCksum(pC->bBigEndCksum, h, 8, ck, c);
  walCksum(pC->bBigEndCksum, h + FRAME_HDR, (int)pC->szPage, c, c);
  if (c[0] != get32(h + 16) || c[1] != get32(h + 20)) return 0;
  ck[0] = c[0];
  ck[1] = c[1];
  return 1;
}

/* Where commit r's frames are in its WAL, and how many bytes they take. */
static sqlite3_int64 frameOffset(const ws_rec *r) {
  return WAL_HDR + (sqlite3_int64)r->frame_start * (FRAME_HDR + r->chain.szPage);
}

static sqlite3_int64 frameBytes(const ws_rec *r) {
  return (sqlite3_int64)(r->frame_end - r->frame_start) * (FRAME_HDR + r->chain.szPage);
}

static void pinFrames(WsDb *pDb);

/* Append r to the queue, numbering it in its database's sequence.  A COMMIT
** is queued with pDb->mu held. */
static void enqueue(WsDb *pDb, ws_rec *r) {
  pthread_mutex_lock(&gMutex);
  if (r->kind == WS_COMMIT) {
    __atomic_add_fetch(&pDb->nPending, 1, __ATOMIC_ACQ_REL);
    if (!pDb->pSpare && gSpare) {
      pDb->pSpare = gSpare;
      gSpare = gSpare->next;
      gnSpare--;
    }
    pinFrames(pDb);
    pDb->aQueued[0] = r->salt1;
    pDb->aQueued[1] = r->salt2;
    pDb->aQueued[2] = r->frame_end;
  }
  r->seq = ++pDb->seq;
  r->next = 0;
  if (gTail) gTail->next = r;
  else gHead = r;
  gTail = r;
  if (gWaiting) pthread_cond_signal(&gCond);
  if (r->kind == WS_COMMIT) gUnread += frameBytes(r);
  pthread_mutex_unlock(&gMutex);
}

/* Queue a record with no page payload (GAP, OPEN, CLOSE). */
/* nMissed: GAP only, see reportGapOf(). */
static void publishEvent(WsDb *pDb, int kind, const char *zText, uint32_t nMissed) {
  size_t n = zText ? strlen(zText) + 1 : 0;
  ws_rec *r = calloc(1, sizeof(*r) + n);
  if (!r) return; /* out of memory: the consumer will see a seq hole */
  r->pDb = pDb;
  r->db_id = pDb->id;
  r->kind = kind;
  r->spool_fd = -1;
  r->time_ns = now_ns();
  r->npages = nMissed;
  if (n) {
    r->path = (char *)(r + 1);
    memcpy(r->path, zText, n);
  }
  enqueue(pDb, r);
}

/* Forget the chain position and tell the consumer the stream broke. */
static void readAnything(WsDb *pDb);

/* nMissed: commits known to be lost with it (its record's npages), 0 if unknown. */
static void reportGapOf(WsDb *pDb, uint32_t nMissed) {
  pthread_mutex_lock(&pDb->mu);
  pDb->c.bKnown = 0;
  pthread_mutex_unlock(&pDb->mu);
  readAnything(pDb);
  publishEvent(pDb, WS_GAP, 0, nMissed);
}

static void reportGap(WsDb *pDb) { reportGapOf(pDb, 0); }

/* Commits SQLite's commit counter went through from `from` to `to` (it wraps),
** 0 if `to` is behind: a counter that went back says nothing. */
static uint32_t commitsCounted(uint32_t from, uint32_t to) {
  return to - from < 0x80000000u ? to - from : 0;
}

/* ------------------------------------------------- host-wide coordination
**
** Several processes may open one database.  Exactly one of them, the
** leader (chosen in Python by flock() on <db>-walsync), replicates it: it
** publishes every commit in the WAL, its own as they happen and the other
** processes' by reading their frames (catchUp()).  Every process that runs
** the shim maps one page of <db>-walsync, WsShared, through which:
**
**   - the leader says who it is and where to send notifications (a unix
**     datagram socket); a follower sends one after its commits, so the
**     leader reads them at once instead of polling;
**   - the leader publishes how far it has read the WAL (`read`: its chain
**     position); every process refuses the exclusive lock on read locks
**     1..4, which SQLite needs to restart the WAL (a writer's walRestartLog,
**     RESTART and TRUNCATE checkpoints), until the leader has read every
**     committed frame, so no commit is lost to a restart.  The leader's own
**     process reads them there and then; another asks the leader to read
**     (a datagram) and waits a little, holding the write lock, so nothing
**     is appended meanwhile.  Reading, not storing: a refused restart makes
**     SQLite append and checkpoint at every commit until it is allowed, and
**     under steady writes the store would never catch up.  While the leader
**     has no place in the chain (it is about to take a snapshot) nothing is
**     refused.
**   - every restart a shim allows, and every new header a shim writes, leaves
**     a link from the WAL that ended (salts, frames) to the next one's salts,
**     so the leader can tell a restart it may continue across from one made
**     by a process without the shim, which is a gap.
*/
#define WS_SHARED_MAGIC 0x57534831u /* "WSH1" */
#define WS_SHARED_SIZE 4096
#define WS_ADDR_MAX 64

#define WS_ROLE_NONE 0   /* not decided: behaves as a single process did */
#define WS_ROLE_LEAD 1
#define WS_ROLE_FOLLOW 2
#define WS_TAKEOVER_NS 2000000000LL /* frames stay protected this long without a leader */
#define WS_READ_WAIT_NS 20000000LL  /* a restart waits this long for the leader to read */
#define WS_READ_ANY 0xFFFFFFFFu /* `read` while the leader has no place in the chain */

/* Three u32 values written by one writer at a time and read by anyone:
** a seqlock.  A writer that died half-way leaves an odd sequence, which the
** next write repairs; a reader gives up after a while and reports failure. */
#define WS_LINKS 8 /* restarts remembered */

typedef struct WsSeq WsSeq;
struct WsSeq {
  uint32_t seq;
  uint32_t v[1 + 5 * WS_LINKS];
};

/* The side file's first page.  Bytes 2048 and up are leader.py's: the leader
** writes there where it replicates the database. */
typedef struct WsShared WsShared;
struct WsShared {
  uint32_t magic;
  uint32_t leadSeq;        /* seqlock over the leader fields */
  int32_t leaderPid;       /* 0: no leader */
  uint32_t pad;
  int64_t leaderDbId;      /* the leader's id for this database */
  int64_t beat;            /* CLOCK_MONOTONIC ns: the leader was last seen (or left) */
  char addr[WS_ADDR_MAX];  /* the leader's socket (abstract name, NUL-padded) */
  WsSeq read;              /* salt1, salt2, frames the leader has read */
  /* The last restarts shims allowed, as links from salt1, salt2, frame
  ** count of the WAL that ended to the salts of the next (v[0]: the newest
  ** link's index).  Salts change when the WAL restarts, and again when a
  ** connection that did not restart it writes its first header. */
  WsSeq links;
};
_Static_assert(sizeof(WsShared) <= 2048, "leader.py writes the side file from byte 2048");

static void seqWrite(WsSeq *s, const uint32_t *v, int n) {
  uint32_t q = __atomic_load_n(&s->seq, __ATOMIC_RELAXED) | 1;
  int i;
  __atomic_store_n(&s->seq, q, __ATOMIC_RELAXED);
  __atomic_thread_fence(__ATOMIC_RELEASE);
  for (i = 0; i < n; i++) __atomic_store_n(&s->v[i], v[i], __ATOMIC_RELAXED);
  __atomic_store_n(&s->seq, q + 1, __ATOMIC_RELEASE);
}

static int seqRead(const WsSeq *s, uint32_t *out, int n) {
  int i, k;
  for (i = 0; i < 10000; i++) {
    uint32_t q = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE), q2;
    if (q & 1) continue;
    for (k = 0; k < n; k++) out[k] = __atomic_load_n(&s->v[k], __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    q2 = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
    if (q == q2) return 1;
  }
  return 0;
}

static void setRead(WsDb *pDb, uint32_t s1, uint32_t s2, uint32_t n) {
  uint32_t v[3] = {s1, s2, n};
  seqWrite(&pDb->pShared->read, v, 3);
}

/* ------------------------------------------------------------ frame pin
**
** Shims refuse to restart the WAL over frames the leader has not read
** (restartAllowed()); a process without the shim (the sqlite3 shell, a cron
** job) restarts or truncates it whenever SQLite lets it.  SQLite lets nobody
** do that while a reader holds one of read locks 1..4, so while this process
** has queued commits whose frames are unread it holds one, through a handle
** of its own on the database: SQLite counts locks per handle, and sharing a
** connection's would let that connection's next unlock drop it.  The slot's
** read mark says "unused", as SQLite's own checkpoints leave idle slots: no
** reader shares it and no checkpoint stops at it, so only restarts wait, and
** only until the consumer has read the frames.  All under gMutex.
*/
#define WS_READ_MARKS 100          /* aReadMark[] in the wal-index: native u32s */
#define WS_MARK_UNUSED 0xffffffffu /* READMARK_NOT_USED */

static sqlite3_vfs ws_vfs; /* defined with the VFS methods */

/* The pin handle, opened and attached to the wal-index on first use (its
** mapping is the process's one, pDb->pShm); NULL if that cannot be done: the
** lock is then simply not held. */
static sqlite3_file *pinHandle(WsDb *pDb) {
  sqlite3_vfs *pOrig = ORIGVFS(&ws_vfs);
  void volatile *pShm = 0;
  sqlite3_file *f;
  char *zName;
  int flags;
  if (pDb->pPin) return pDb->pPin;
  f = sqlite3_malloc(pOrig->szOsFile);
  zName = (char *)sqlite3_create_filename(pDb->zPath, "", "", 0, 0);
  if (f) memset(f, 0, (size_t)pOrig->szOsFile);
  if (!f || !zName || pOrig->xOpen(pOrig, zName, f, SQLITE_OPEN_READWRITE | SQLITE_OPEN_MAIN_DB, &flags) ||
      f->pMethods->iVersion < 2 || f->pMethods->xShmMap(f, 0, 32768, 0, &pShm) != SQLITE_OK || !pShm) {
    if (f && f->pMethods) {
      if (f->pMethods->iVersion >= 2) f->pMethods->xShmUnmap(f, 0);
      f->pMethods->xClose(f);
    }
    sqlite3_free(f);
    sqlite3_free_filename(zName);
    return 0;
  }
  pDb->zPinName = zName;
  return pDb->pPin = f;
}

static volatile uint32_t *readMark(WsDb *pDb, int i) {
  return (volatile uint32_t *)(pDb->pShm + WS_READ_MARKS + 4 * i);
}

/* Hold read lock i if its mark is still unused; 1 if it is held. */
static int pinSlot(WsDb *pDb, sqlite3_file *f, int i) {
  if (f->pMethods->xShmLock(f, 3 + i, 1, SQLITE_SHM_LOCK | SQLITE_SHM_SHARED) != SQLITE_OK) return 0;
  if (__atomic_load_n(readMark(pDb, i), __ATOMIC_ACQUIRE) == WS_MARK_UNUSED) return 1;
  f->pMethods->xShmLock(f, 3 + i, 1, SQLITE_SHM_UNLOCK | SQLITE_SHM_SHARED);
  return 0; /* a reader took the slot for its own mark meanwhile */
}

/* Hold a read lock, unless one is held already: the last slot used if it is
** still free, else the first of 4..2 nobody holds (slot 1 is left to readers:
** SQLite always keeps a usable mark there). */
static void pinFrames(WsDb *pDb) {
  sqlite3_file *f;
  int i;
  if (pDb->iPin || !pDb->pShm || !(f = pinHandle(pDb))) return;
  if (pDb->iLastPin && pinSlot(pDb, f, pDb->iLastPin)) {
    pDb->iPin = pDb->iLastPin;
    return;
  }
  for (i = 4; i >= 2; i--) {
    if (f->pMethods->xShmLock(f, 3 + i, 1, SQLITE_SHM_LOCK | SQLITE_SHM_EXCLUSIVE) != SQLITE_OK) continue;
    __atomic_store_n(readMark(pDb, i), WS_MARK_UNUSED, __ATOMIC_RELEASE);
    f->pMethods->xShmLock(f, 3 + i, 1, SQLITE_SHM_UNLOCK | SQLITE_SHM_EXCLUSIVE);
    if (pinSlot(pDb, f, i)) {
      pDb->iPin = pDb->iLastPin = i;
      return;
    }
  }
}

static void pinDrop(WsDb *pDb) {
  if (pDb->iPin) {
    pDb->pPin->pMethods->xShmLock(pDb->pPin, 3 + pDb->iPin, 1, SQLITE_SHM_UNLOCK | SQLITE_SHM_SHARED);
    pDb->iPin = 0;
  }
}

/* Before this process's last mapping of the wal-index goes: SQLite deletes it
** with the last one. */
static void pinClose(WsDb *pDb) {
  pinDrop(pDb);
  if (pDb->pPin) {
    pDb->pPin->pMethods->xShmUnmap(pDb->pPin, 0);
    pDb->pPin->pMethods->xClose(pDb->pPin);
    sqlite3_free(pDb->pPin);
    sqlite3_free_filename(pDb->zPinName);
    pDb->pPin = 0;
    pDb->zPinName = 0;
  }
}

/* The frames of every commit queued so far are in memory (gMutex held,
** nPending is 0): let go of them, and if leading, let the WAL restart up to
** the last one. */
static void readTo(WsDb *pDb) {
  pinDrop(pDb);
  if (pDb->eRole == WS_ROLE_LEAD && pDb->pShared && pDb->aQueued[2]) {
    setRead(pDb, pDb->aQueued[0], pDb->aQueued[1], pDb->aQueued[2]);
  }
}

/* Map <db>-walsync (created with the database file's permissions); NULL if
** that is impossible (a read-only directory): the process then behaves as
** the only one. */
static WsShared *sharedMap(const char *zPath) {
  char *zSide = sqlite3_mprintf("%s-walsync", zPath);
  struct stat st;
  mode_t mode = 0644;
  int fd;
  void *p;
  WsShared *s;
  uint32_t zero = 0;
  if (!zSide) return 0;
  if (stat(zPath, &st) == 0) mode = st.st_mode & 0666;
  fd = open(zSide, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, mode);
  sqlite3_free(zSide);
  if (fd < 0) return 0;
  if (fstat(fd, &st) != 0 || (st.st_size < WS_SHARED_SIZE && ftruncate(fd, WS_SHARED_SIZE) != 0)) {
    close(fd);
    return 0;
  }
  p = mmap(0, WS_SHARED_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd); /* the mapping stays; nobody holds POSIX locks on this file */
  if (p == MAP_FAILED) return 0;
  s = p;
  __atomic_compare_exchange_n(&s->magic, &zero, WS_SHARED_MAGIC, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  if (__atomic_load_n(&s->magic, __ATOMIC_ACQUIRE) != WS_SHARED_MAGIC) {
    munmap(p, WS_SHARED_SIZE);
    return 0;
  }
  return s;
}

/* The leader's pid, id and socket, if a live process leads the database. */
static int leaderOf(const WsShared *s, int64_t *pDbId, char *zAddr) {
  int i;
  for (i = 0; s && i < 10000; i++) {
    uint32_t q = __atomic_load_n(&s->leadSeq, __ATOMIC_ACQUIRE);
    int32_t pid;
    if (q & 1) continue;
    pid = __atomic_load_n(&s->leaderPid, __ATOMIC_RELAXED);
    if (pDbId) *pDbId = __atomic_load_n(&s->leaderDbId, __ATOMIC_RELAXED);
    if (zAddr) memcpy(zAddr, s->addr, WS_ADDR_MAX);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&s->leadSeq, __ATOMIC_RELAXED) != q) continue;
    if (pid <= 0 || (kill(pid, 0) != 0 && errno != EPERM)) return 0;
    return pid;
  }
  return 0;
}

/* The wal-index header as the writer that holds the WAL lock (or any reader,
** given two equal copies) sees it: salts, the last committed frame and, if
** pChange is not NULL, the commit counter iChange. */
static int shmHeader(WsDb *pDb, uint32_t *pSalt1, uint32_t *pSalt2, uint32_t *pMax, uint32_t *pChange) {
  volatile unsigned char *h = pDb->pShm;
  unsigned char a[48], b[48];
  int i;
  if (!h) return 0;
  for (i = 0; i < 100; i++) {
    memcpy(a, (const void *)h, 48);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    memcpy(b, (const void *)(h + 48), 48);
    if (memcmp(a, b, 48) == 0 && a[12]) { /* isInit */
      memcpy(pMax, a + 16, 4);
      if (pChange) memcpy(pChange, a + 8, 4);
      *pSalt1 = get32(a + 32);
      *pSalt2 = get32(a + 36);
      return 1;
    }
  }
  return 0;
}

static int gNotifyFd = -1;

/* Tell the leader that the WAL grew (a datagram naming its id for the db);
** at most one per millisecond per database: the leader reads again after
** every read that found commits, so none is missed.  bNow (a restart waits
** for the read) is sent regardless and leaves the next commit's own. */
static void notifyLeader(WsDb *pDb, int bNow) {
  struct sockaddr_un sa;
  struct timespec ts;
  int64_t id, now;
  char zAddr[WS_ADDR_MAX];
  clock_gettime(CLOCK_MONOTONIC, &ts);
  now = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
  if (!bNow && now - pDb->lastNotify < 1000000) return;
  if (!leaderOf(pDb->pShared, &id, zAddr) || !zAddr[0]) return;
  if (!bNow) pDb->lastNotify = now;
  if (gNotifyFd < 0) gNotifyFd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (gNotifyFd < 0) return;
  memset(&sa, 0, sizeof(sa));
  sa.sun_family = AF_UNIX;
  memcpy(sa.sun_path + 1, zAddr, strnlen(zAddr, WS_ADDR_MAX));
  sendto(gNotifyFd, &id, sizeof(id), MSG_DONTWAIT, (struct sockaddr *)&sa,
         (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strnlen(zAddr, WS_ADDR_MAX)));
}

static int64_t monotonicNs(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Has the leader read every committed frame of the WAL (s1, s2, mx)? */
static int readUpTo(WsDb *pDb, uint32_t s1, uint32_t s2, uint32_t mx) {
  uint32_t rd[3];
  return seqRead(&pDb->pShared->read, rd, 3) &&
         (rd[2] == WS_READ_ANY || (rd[0] == s1 && rd[1] == s2 && rd[2] >= mx));
}

static int catchUp(WsDb *pDb, uint32_t s1, uint32_t s2, uint32_t nEnd, const uint32_t *pChange);
static void freeRecord(ws_rec *r);

/* Before SQLite restarts the WAL (or a checkpoint truncates it): may it?
** Only once the leader has read every committed frame in it (the caller
** holds the lock that keeps others from appending), or a while after the
** leader went away: the next one takes what its predecessor left from the
** WAL, once it has synced. */
static int restartAllowed(WsDb *pDb) {
  uint32_t s1, s2, mx, ic;
  int64_t until = 0;
  if (!pDb->pShared || !pDb->pShm || !shmHeader(pDb, &s1, &s2, &mx, &ic) || mx == 0) return 1;
  if (pDb->eRole == WS_ROLE_LEAD) {
    /* Queued, its frames are read before SQLite overwrites them (see
    ** waitConsumed()); a gap lets go of every frame. */
    pthread_mutex_lock(&pDb->mu);
    if (pDb->c.bKnown) catchUp(pDb, s1, s2, mx, &ic);
    pthread_mutex_unlock(&pDb->mu);
    return 1;
  }
  for (;;) {
    struct timespec pause = {0, 100000};
    if (readUpTo(pDb, s1, s2, mx)) return 1;
    if (!leaderOf(pDb->pShared, 0, 0)) {
      /* nobody replicates it: the next leader starts from a snapshot */
      return monotonicNs() - __atomic_load_n(&pDb->pShared->beat, __ATOMIC_ACQUIRE) > WS_TAKEOVER_NS;
    }
    if (!until) {
      until = monotonicNs() + WS_READ_WAIT_NS;
      notifyLeader(pDb, 1);
    } else if (monotonicNs() > until) {
      return 0;
    }
    nanosleep(&pause, 0);
  }
}

/* Record that the WAL (f1, f2) ended with fn frames and (t1, t2) follows it.
** Callers hold the WAL write lock, so links are written one at a time. */
static void addLink(WsDb *pDb, uint32_t f1, uint32_t f2, uint32_t fn, uint32_t t1, uint32_t t2) {
  uint32_t v[1 + 5 * WS_LINKS], *l;
  if (!pDb->pShared) return;
  /* Under the write lock nobody else writes links: an unreadable table was left
  ** by a writer that died half-way.  Start it afresh (a link lost costs a resync)
  ** rather than never record a restart again. */
  if (!seqRead(&pDb->pShared->links, v, 1 + 5 * WS_LINKS)) memset(v, 0, sizeof(v));
  v[0] = (v[0] + 1) % WS_LINKS;
  l = v + 1 + 5 * v[0];
  l[0] = f1;
  l[1] = f2;
  l[2] = fn;
  l[3] = t1;
  l[4] = t2;
  seqWrite(&pDb->pShared->links, v, 1 + 5 * WS_LINKS);
}

/* The exclusive lock SQLite restarts the WAL under is taken: note the WAL it
** may end.  walRestartHdr() writes the new salts into the wal-index before
** the lock is released (restartDone()). */
static void restartBegin(WsFile *pMain) {
  WsDb *pDb = pMain->pDb;
  pMain->bRestart = pDb->pShared && pDb->pShm &&
                    shmHeader(pDb, &pMain->aRestart[0], &pMain->aRestart[1], &pMain->aRestart[2], 0);
}

static void restartDone(WsFile *pMain) {
  WsDb *pDb = pMain->pDb;
  uint32_t s1, s2, mx;
  const uint32_t *a = pMain->aRestart;
  if (!pMain->bRestart) return;
  pMain->bRestart = 0;
  if (shmHeader(pDb, &s1, &s2, &mx, 0) && (s1 != a[0] || s2 != a[1])) {
    addLink(pDb, a[0], a[1], a[2], s1, s2);
  }
}

/* A WAL header is being written: a connection that did not restart the WAL
** itself gives it new random salts (wal.c, walFrames()). */
static void headerWritten(WsDb *pDb, const unsigned char *h) {
  uint32_t s1, s2, mx;
  if (pDb->pShared && pDb->pShm && shmHeader(pDb, &s1, &s2, &mx, 0) && mx == 0 &&
      (get32(h + 16) != s1 || get32(h + 20) != s2)) {
    addLink(pDb, s1, s2, 0, get32(h + 16), get32(h + 20));
  }
}

/* The leader lost its place in the chain (a gap, a new lead): it will take a
** snapshot at its next sync point, so no frame needs protecting until then.
** Needed, not just harmless: the sync point takes the WAL write lock, which a
** checkpoint waiting for the leader to read would hold. */
static void readAnything(WsDb *pDb) {
  if (pDb->eRole == WS_ROLE_LEAD && pDb->pShared) setRead(pDb, 0, 0, WS_READ_ANY);
}

/* Did shims allow every restart from where pDb's chain ends to the WAL with
** salts (s1, s2), each WAL on the way but the first ending empty? */
static int permitted(WsDb *pDb, uint32_t s1, uint32_t s2) {
  uint32_t v[1 + 5 * WS_LINKS], cur[3] = {pDb->c.salt1, pDb->c.salt2, pDb->c.nFrame};
  int step, k;
  if (!pDb->pShared || !seqRead(&pDb->pShared->links, v, 1 + 5 * WS_LINKS)) return 0;
  for (step = 0; step < WS_LINKS; step++) {
    const uint32_t *l = 0;
    for (k = 0; k < WS_LINKS && !l; k++) { /* newest first */
      const uint32_t *c = v + 1 + 5 * ((v[0] + WS_LINKS - k) % WS_LINKS);
      if (c[0] == cur[0] && c[1] == cur[1] && c[2] == cur[2] && (c[3] || c[4])) l = c;
    }
    if (!l) return 0;
    if (l[3] == s1 && l[4] == s2) return 1;
    cur[0] = l[3];
    cur[1] = l[4];
    cur[2] = 0;
  }
  return 0;
}

static int preadFull(int fd, unsigned char *a, sqlite3_int64 n, sqlite3_int64 off);

/* Is frame f an exact copy (page number, size, page) of commit frame f-1? */
static int isPadding(int fd, const WsChain *c, uint32_t f) {
  sqlite3_int64 szFrame = FRAME_HDR + c->szPage;
  unsigned char *a = malloc((size_t)szFrame * 2);
  int same = 0;
  if (a && preadFull(fd, a, szFrame * 2, WAL_HDR + (sqlite3_int64)(f - 1) * szFrame) == 0) {
    same = get32(a + 4) != 0 && memcmp(a, a + szFrame, 8) == 0 &&
           memcmp(a + FRAME_HDR, a + szFrame + FRAME_HDR, c->szPage) == 0;
  }
  free(a);
  return same;
}

/* A COMMIT record for frames [f0, f1) of the chain state c ends with the
** checksum endCk and leaves the database at dbSize pages. */
static ws_rec *commitRecord(WsDb *pDb, const WsChain *c, uint32_t f0, uint32_t f1, uint32_t dbSize,
                            const uint32_t *endCk) {
  ws_rec *r = pDb->pSpare;
  if (r) {
    pDb->pSpare = 0;
    memset(r, 0, sizeof(*r));
  } else if (!(r = calloc(1, sizeof(*r)))) {
    return 0;
  }
  r->pDb = pDb;
  r->db_id = pDb->id;
  r->kind = WS_COMMIT;
  r->spool_fd = -1;
  r->page_size = c->szPage;
  r->time_ns = now_ns();
  r->db_size = dbSize;
  r->salt1 = c->salt1;
  r->salt2 = c->salt2;
  r->frame_start = f0;
  r->frame_end = f1;
  r->chain = *c;
  r->endCk[0] = endCk[0];
  r->endCk[1] = endCk[1];
  return r;
}

/*
** Did the WAL that chain c is in end at c->nFrame?  Asked when a process
** without the shim restarted it (salt-1 stepped by one, no link): the frames
** the new WAL has not overwritten yet still hold the old one's bytes, so what
** follows our position shows whether it held commits we never read.  A frame
** already overwritten, or the file's end (a truncated WAL), proves nothing.
*/
static int endedAt(int fd, const WsChain *c, uint32_t s1, uint32_t s2) {
  sqlite3_int64 szFrame = FRAME_HDR + c->szPage, off;
  uint32_t ck[2] = {c->cksum[0], c->cksum[1]}, f;
  unsigned char *a = malloc((size_t)szFrame), again[FRAME_HDR];
  int ended = 0;
  for (f = c->nFrame; a; f++) {
    off = WAL_HDR + (sqlite3_int64)f * szFrame;
    if (preadFull(fd, a, szFrame, off) || (get32(a + 8) == s1 && get32(a + 12) == s2)) break;
    if (!frameValid(c, a, ck)) {
      /* Not the old chain, unless the new WAL's frame was being written as we
      ** read (its header is written first): read the header again. */
      ended = pread(fd, again, FRAME_HDR, off) == FRAME_HDR && memcmp(again, a, FRAME_HDR) == 0;
      break;
    }
    if (get32(a + 4)) break; /* a commit we never read */
  }
  free(a);
  return ended;
}

/*
** Bring pDb's chain up to frame nEnd of the WAL whose salts are (s1, s2),
** publishing the commits other processes made in between, one record each
** (the consumer verifies their frames like any other).  Frames below nEnd
** are committed, and stay put: no restart is allowed before the leader has
** read them.  If the WAL was restarted since the chain's position, the new
** one continues the stream if a shim permitted the restart at exactly that
** position, or if the wal-index's commit counter, *pChange when frame nEnd
** was its last (NULL: not known), counts no commit but the chain's and the
** new WAL's: a process without the shim wrote the new WAL's first header.
** Returns 0 if the chain now ends at nEnd (or nothing can be read yet), 1
** after reporting a gap.  Caller holds pDb->mu.
*/
/* Queue (bQueue) or drop the records of a list built by catchUp(). */
static void settleRecords(WsDb *pDb, ws_rec *r, int bQueue) {
  ws_rec *next;
  for (; r; r = next) {
    next = r->next;
    if (bQueue) enqueue(pDb, r);
    else freeRecord(r);
  }
}

static int catchUp(WsDb *pDb, uint32_t s1, uint32_t s2, uint32_t nEnd, const uint32_t *pChange) {
  WsChain c = pDb->c;
  unsigned char h[WAL_HDR];
  uint32_t f, start, szFrame;
  ws_rec *first = 0, *prev = 0; /* records made, queued once they are known to continue */
  int fd, bCounted = 0;
  uint32_t nMissed = 0; /* commits the counter says were lost, if that is how it broke */
  char *zWal;
  if (!c.bKnown) return 0;
  if (c.bHdr && c.salt1 == s1 && c.salt2 == s2 && nEnd <= c.nFrame) {
    if (pChange && nEnd == c.nFrame) {
      pDb->c.iChange = *pChange;
      pDb->c.bChange = 1;
    }
    return 0;
  }
  zWal = sqlite3_mprintf("%s-wal", pDb->zPath);
  fd = zWal ? open(zWal, O_RDONLY | O_CLOEXEC) : -1;
  sqlite3_free(zWal);
  if (fd < 0) goto gap;
  if (!c.bHdr || c.salt1 != s1 || c.salt2 != s2) {
    /* A WAL whose header we have not read: the one expected at the sync
    ** point, or one that permitted restarts lead to from our position. */
    if ((c.salt1 != s1 || c.salt2 != s2) && !permitted(pDb, s1, s2) &&
        !(c.bHdr && s1 == c.salt1 + 1 && endedAt(fd, &c, s1, s2))) {
      if (!pChange || !c.bChange) goto gap;
      bCounted = 1;
    }
    if (nEnd == 0) goto done; /* its header is not written yet */
    if (pread(fd, h, WAL_HDR, 0) != WAL_HDR || !parseWalHeader(&c, h) || c.salt1 != s1 ||
        c.salt2 != s2) {
      goto gap;
    }
  }
  if (nEnd < c.nFrame) goto gap;
  szFrame = FRAME_HDR + c.szPage;
  start = c.nFrame;
  for (f = c.nFrame; f < nEnd; f++) {
    unsigned char fh[FRAME_HDR];
    uint32_t endCk[2];
    ws_rec *r;
    if (pread(fd, fh, FRAME_HDR, WAL_HDR + (off_t)f * szFrame) != FRAME_HDR ||
        get32(fh + 8) != c.salt1 || get32(fh + 12) != c.salt2) {
      goto gap;
    }
    if (!get32(fh + 4)) continue;
    /* A commit frame. */
    endCk[0] = get32(fh + 16);
    endCk[1] = get32(fh + 20);
    if (prev && start == f && isPadding(fd, &c, f)) {
      /* synchronous=FULL without powersafe overwrite pads a commit with
      ** copies of its commit frame: they belong to that commit. */
      prev->frame_end = f + 1;
      prev->endCk[0] = endCk[0];
      prev->endCk[1] = endCk[1];
    } else {
      r = commitRecord(pDb, &c, start, f + 1, get32(fh + 4), endCk);
      if (!r) goto gap;
      if (prev) prev->next = r;
      else first = r;
      prev = r;
      c.iChange++;
    }
    c.nFrame = f + 1;
    c.cksum[0] = endCk[0];
    c.cksum[1] = endCk[1];
    start = f + 1;
  }
done:
  if (pChange) {
    if (bCounted && c.iChange != *pChange) {
      /* Commits were erased unread: they, and those read here, which only the
      ** counter could have vouched for, lose their restore points. */
      nMissed = commitsCounted(pDb->c.iChange, *pChange);
      goto gap;
    }
    c.iChange = *pChange;
    c.bChange = 1;
  }
  pDb->c = c;
  close(fd);
  settleRecords(pDb, first, 1);
  return 0;
gap:
  /* The commits read before the break continue the chain, unless only the
  ** counter could have said so. */
  settleRecords(pDb, first, !bCounted);
  if (fd >= 0) close(fd);
  reportGapOf(pDb, nMissed);
  return 1;
}

/*
** Publish the committed transaction held in pDb's mirror, if any, and reset
** the mirror.  Called with the WAL write lock still held (or, in EXCLUSIVE
** locking mode, by the only connection), so pDb's chain state is ours alone.
**
** The mirror covers WAL bytes [iStart, iStart+nBuf).  If it starts at 0 the
** WAL was restarted and the header comes first.  Only frame headers are read
** here: the transaction ends at the last commit frame (synchronous=FULL pads
** with copies of it) in the run of frames carrying our salts; anything after
** it was rolled back.  The commit frame's stored checksum becomes the chain
** position, and a record naming the frames is queued.  prepareCommit(), on
** the consumer's thread, reads them from the WAL file, recomputes the chain
** over every frame and turns the record into a GAP unless it ends exactly at
** that checksum, so nothing unverified is ever handed to Python.
*/
static void publishLocked(WsDb *pDb, sqlite3_int64 nBuf);

/* The wal-index header while the transaction being published (its frames
** from fStart on) still holds the write lock, with the commit counter as it
** was before that transaction: the transaction stepped it once, unless it
** rolled back. */
static int headerBefore(WsDb *pDb, uint32_t fStart, uint32_t *pSalt1, uint32_t *pSalt2, uint32_t *pChange) {
  uint32_t mx;
  if (!shmHeader(pDb, pSalt1, pSalt2, &mx, pChange)) return 0;
  if (mx > fStart) (*pChange)--;
  return 1;
}

/* Is the transaction being published in a new WAL the only commit since the
** chain's end? */
static int onlyOurs(WsDb *pDb) {
  uint32_t s1, s2, ic;
  return pDb->c.bChange && headerBefore(pDb, 0, &s1, &s2, &ic) && ic == pDb->c.iChange;
}

/* How many commits came between the chain's end and the transaction being
** published in a new WAL, by SQLite's commit counter (0 if it cannot tell). */
static uint32_t commitsBetween(WsDb *pDb) {
  uint32_t s1, s2, ic;
  if (!pDb->c.bChange || !headerBefore(pDb, 0, &s1, &s2, &ic)) return 0;
  return commitsCounted(pDb->c.iChange, ic);
}

static void publishPending(WsDb *pDb) {
  sqlite3_int64 nBuf = pDb->nBuf;

  pDb->nBuf = 0;
  if (nBuf == 0) return;
  if (pDb->eRole == WS_ROLE_FOLLOW) {
    uint32_t s1, s2, mx;
    if (shmHeader(pDb, &s1, &s2, &mx, 0) && (mx != pDb->own[2] || s1 != pDb->own[0] || s2 != pDb->own[1])) {
      pDb->own[0] = s1;
      pDb->own[1] = s2;
      pDb->own[2] = mx;
      notifyLeader(pDb, 0);
    }
    return;
  }
  pthread_mutex_lock(&pDb->mu);
  publishLocked(pDb, nBuf);
  pthread_mutex_unlock(&pDb->mu);
}

/* The mirrored header of frame f (zeros if none was written: no valid frame). */
static const unsigned char *mirrorFrame(const WsDb *p, uint32_t f) {
  static const unsigned char zero[FRAME_HDR];
  if (f < p->fBase || f - p->fBase >= p->nFh) return zero;
  return p->aFh + (size_t)(f - p->fBase) * FRAME_HDR;
}

static void publishLocked(WsDb *pDb, sqlite3_int64 nBuf) {
  sqlite3_int64 off = 0, f0Off;
  uint32_t endCk[2] = {0, 0}, f0, i, nCommit = 0, dbSize = 0, szFrame;
  WsChain c;
  ws_rec *r;
  if (!pDb->c.bKnown) return;
  if (pDb->iStart != 0 && pDb->pShm) {
    /* Frames other processes committed since our last publish come first. */
    uint32_t s1, s2, ic, fStart;
    WsChain k = pDb->c;
    szFrame = FRAME_HDR + k.szPage;
    fStart = (uint32_t)((pDb->iStart - WAL_HDR) / szFrame);
    if (k.bHdr && headerBefore(pDb, fStart, &s1, &s2, &ic) && (pDb->iStart - WAL_HDR) % szFrame == 0 &&
        catchUp(pDb, s1, s2, fStart, &ic)) {
      return;
    }
  }

  if (pDb->bLost) { /* frames we cannot vouch for: the stream breaks here */
    reportGap(pDb);
    return;
  }
  c = pDb->c;
  if (pDb->iStart == 0) {
    /* WAL restart: a new header.  SQLite steps salt-1 by one per restart:
    ** once here, or once per TRUNCATE checkpoint of ours.  Rewriting the
    ** header of a WAL without frames (after recovery of a crashed first
    ** transaction) keeps the salts.  Anything else means somebody else
    ** restarted it, erasing frames we never saw. */
    if (nBuf < WAL_HDR || !parseWalHeader(&c, pDb->aWalHdr)) return;
    if (pDb->c.bHdr && pDb->c.nFrame && c.salt1 == pDb->c.salt1 && c.salt2 == pDb->c.salt2) {
      c = pDb->c; /* a tail scan read this header, and maybe our commit (below) */
    } else if (pDb->c.bHdr && c.salt1 != pDb->c.salt1 + (pDb->c.nTrunc ? pDb->c.nTrunc : 1) &&
        !(pDb->c.nFrame == 0 && c.salt1 == pDb->c.salt1 && c.salt2 == pDb->c.salt2) &&
        !permitted(pDb, c.salt1, c.salt2) && !onlyOurs(pDb)) {
      reportGapOf(pDb, commitsBetween(pDb));
      return;
    }
    off = WAL_HDR;
  } else if (!c.bHdr) {
    reportGap(pDb);
    return;
  }
  f0Off = pDb->iStart + off;
  szFrame = FRAME_HDR + c.szPage;
  if ((f0Off - WAL_HDR) % szFrame) {
    reportGap(pDb);
    return;
  }
  f0 = (uint32_t)((f0Off - WAL_HDR) / szFrame);
  if (f0 > c.nFrame || (pDb->szMirror && pDb->szMirror != c.szPage)) {
    reportGap(pDb); /* SQLite appended after frames we never saw */
    return;
  }
  for (i = 0; off + szFrame <= nBuf; i++, off += szFrame) {
    const unsigned char *h = mirrorFrame(pDb, f0 + i);
    if (get32(h) == 0 || get32(h + 8) != c.salt1 || get32(h + 12) != c.salt2) break;
    if (get32(h + 4)) {
      nCommit = i + 1;
      dbSize = get32(h + 4);
      endCk[0] = get32(h + 16);
      endCk[1] = get32(h + 20);
    }
  }
  /* A commit marker with our salts past a broken run means a committed
  ** transaction we cannot verify: never drop it silently. */
  for (; off + szFrame <= nBuf; i++, off += szFrame) {
    const unsigned char *h = mirrorFrame(pDb, f0 + i);
    if (get32(h + 4) && get32(h + 8) == c.salt1 && get32(h + 12) == c.salt2) {
      reportGap(pDb);
      return;
    }
  }
  if (nCommit == 0) return; /* rolled back */
  if (f0 < c.nFrame) {
    /* A tail scan (ws_tail) read the WAL between SQLite's commit and this
    ** publish: it queued this very commit if the chain ends exactly here. */
    if (f0 + nCommit != c.nFrame || endCk[0] != c.cksum[0] || endCk[1] != c.cksum[1]) {
      reportGap(pDb);
    }
    return;
  }

  r = commitRecord(pDb, &c, f0, f0 + nCommit, dbSize, endCk);
  if (!r) {
    reportGap(pDb);
    return;
  }
  c.nFrame = f0 + nCommit;
  c.cksum[0] = endCk[0];
  c.cksum[1] = endCk[1];
  c.iChange++;
  pDb->c = c;
  enqueue(pDb, r);
}

typedef struct { uint32_t pgno, iFrame; } PageRef;

static int cmpPageRef(const void *a, const void *b) {
  const PageRef *x = a, *y = b;
  if (x->pgno != y->pgno) return x->pgno < y->pgno ? -1 : 1;
  return x->iFrame < y->iFrame ? -1 : (x->iFrame > y->iFrame);
}

/* Read n bytes at off, retrying short reads; 0 on success. */
static int preadFull(int fd, unsigned char *a, sqlite3_int64 n, sqlite3_int64 off) {
  while (n > 0) {
    ssize_t got = pread(fd, a, (size_t)n, (off_t)off);
    if (got <= 0) {
      if (got < 0 && errno == EINTR) continue;
      return 1;
    }
    a += got;
    n -= got;
    off += got;
  }
  return 0;
}

/* Commits whose frames take more bytes than this are copied into a file of
** their own instead of memory (ws_spool_big()); at most WS_BIG_MAX, so a read
** of a commit held in memory fits SQLite's int amount. */
#define WS_BIG_MAX ((sqlite3_int64)1 << 30)
#define WS_BIG_DEFAULT ((sqlite3_int64)16 << 20)
#define WS_CHUNK ((sqlite3_int64)1 << 20) /* bytes copied or verified at a time */
/* Its own mutex: waitConsumed() reads frames holding gMutex. */
static pthread_mutex_t gSpoolMutex = PTHREAD_MUTEX_INITIALIZER;
static char *gSpoolDir = 0; /* gSpoolMutex */

static WsDb *dbById(int64_t id);

/* Where, and past what size, a database's commits go to files (Python: the
** spool directory and its max_segment_bytes). */
void ws_spool_big(int64_t db_id, int64_t nBytes, const char *zDir) {
  WsDb *pDb = dbById(db_id);
  char *z = zDir ? strdup(zDir) : 0;
  sqlite3_int64 n = nBytes < WS_CHUNK ? WS_CHUNK : nBytes > WS_BIG_MAX ? WS_BIG_MAX : nBytes;
  if (pDb) __atomic_store_n(&pDb->nBig, n, __ATOMIC_RELAXED);
  pthread_mutex_lock(&gSpoolMutex);
  if (z) {
    free(gSpoolDir);
    gSpoolDir = z;
  }
  pthread_mutex_unlock(&gSpoolMutex);
}

/* A new file without a name (removed when closed) in the spool directory. */
static int spoolOpen(void) {
  char *zDir, *zName;
  int fd = -1;
  pthread_mutex_lock(&gSpoolMutex);
  zDir = strdup(gSpoolDir ? gSpoolDir : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  pthread_mutex_unlock(&gSpoolMutex);
  if (!zDir) return -1;
#ifdef O_TMPFILE
  fd = open(zDir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
#endif
  if (fd < 0 && (zName = sqlite3_mprintf("%s/walsync-commit-XXXXXX", zDir)) != 0) {
    fd = mkostemp(zName, O_CLOEXEC);
    if (fd >= 0) unlink(zName);
    sqlite3_free(zName);
  }
  free(zDir);
  return fd;
}

/* n bytes at off, through pFile (n fits an int) if given, else from fd; 0 on success. */
static int readAt(sqlite3_file *pFile, int fd, unsigned char *a, sqlite3_int64 n, sqlite3_int64 off) {
  return pFile ? pFile->pMethods->xRead(pFile, a, (int)n, off) != SQLITE_OK : preadFull(fd, a, n, off);
}

static int writeFull(int fd, const unsigned char *a, sqlite3_int64 n, sqlite3_int64 off) {
  while (n > 0) {
    ssize_t put = pwrite(fd, a, (size_t)n, (off_t)off);
    if (put <= 0) {
      if (put < 0 && errno == EINTR) continue;
      return 1;
    }
    a += put;
    n -= put;
    off += put;
  }
  return 0;
}

/* Frames of consecutive commits read with one call: the bytes follow the
** header, and the block is freed with the last commit pointing into it.  Only
** the consumer thread frees records, so the count needs no atomics.  The memory
** comes from the blocks runs are made of (commits.c), kept for reuse in the same
** sizes: never MiB-sized chunks of the C library's heap, which glibc would keep in
** its arenas once freed. */
typedef union WsBlock WsBlock;
union WsBlock {
  uint32_t nRef;
  int64_t align_; /* the bytes after it start 8-byte aligned */
};
void *ws_mem_new(uint64_t n);
void ws_mem_free(void *p);

static void releaseFrames(ws_rec *r) {
  if (r->pBlock && --r->pBlock->nRef == 0) ws_mem_free(r->pBlock);
  r->pBlock = 0;
  r->aFrames = 0;
}

/* A commit over this many bytes is copied to a spool file, never held in memory. */
static sqlite3_int64 bigBytes(WsDb *pDb) {
  sqlite3_int64 big = __atomic_load_n(&pDb->nBig, __ATOMIC_RELAXED);
  return big ? big : WS_BIG_DEFAULT;
}

/* Copy a big commit's frames, a chunk at a time, through pFile if given, else
** from fd, into a spool file (r->spool_fd, -1 if that failed). */
static void spoolFrames(ws_rec *r, sqlite3_file *pFile, int fd) {
  sqlite3_int64 n = frameBytes(r), off = frameOffset(r), done, m;
  unsigned char *a = malloc((size_t)WS_CHUNK);
  r->spool_fd = a ? spoolOpen() : -1;
  for (done = 0; r->spool_fd >= 0 && done < n; done += m) {
    m = n - done < WS_CHUNK ? n - done : WS_CHUNK;
    if (readAt(pFile, fd, a, m, off + done) || writeFull(r->spool_fd, a, m, done)) {
      close(r->spool_fd);
      r->spool_fd = -1;
    }
  }
  free(a);
}

static int unreadCommit(const ws_rec *r, const WsDb *pDb) {
  return r && r->pDb == pDb && r->kind == WS_COMMIT && !r->bRead;
}

/* Frames read at once for a run of several commits: at most the biggest block
** size kept for reuse (WS_MAX_BLOCK in commits.c), so that a steady stream's
** reads reuse their memory. */
#define WS_RUN_READ ((sqlite3_int64)4 << 20)

/* Claim commit r and the unread commits of its database right after it in the
** list that continue it in the same WAL, up to WS_RUN_READ (or the big-commit
** bound) in all (a bigger commit alone): marks them read, sets *pBytes to their
** frames' size and returns how many.  Called where the list cannot change
** (gMutex held, or a detached list). */
static uint32_t claimRun(ws_rec *r, sqlite3_int64 *pBytes) {
  sqlite3_int64 big = bigBytes(r->pDb), n = frameBytes(r);
  sqlite3_int64 most = big < WS_RUN_READ ? big : WS_RUN_READ;
  ws_rec *q = r, *p = r->next;
  uint32_t nRec = 1;
  r->bRead = 1;
  for (; unreadCommit(p, r->pDb) && p->frame_start == q->frame_end && p->salt1 == r->salt1 &&
         p->salt2 == r->salt2 && n + frameBytes(p) <= most;
       q = p, p = p->next) {
    p->bRead = 1;
    n += frameBytes(p);
    nRec++;
  }
  *pBytes = n;
  return nRec;
}

/* Read the frames of the nRec commits claimRun() claimed from r on, with one
** read (through pFile, the writer's WAL handle, if given, else from fd) into
** one block: one system call per run of small commits instead of one per
** commit.  A big commit goes to a spool file instead.  Neither aFrames nor
** spool_fd is set where the read failed (a GAP follows).  Returns the last of
** the nRec records, walking to it and never past it: it may be the queue's
** tail, whose next pointer a writer sets. */
static ws_rec *readClaimed(ws_rec *r, uint32_t nRec, sqlite3_int64 n, sqlite3_file *pFile, int fd) {
  sqlite3_int64 at = 0;
  WsBlock *pBlock;
  uint32_t i;
  if (nRec == 1 && n > bigBytes(r->pDb)) { /* a run of several always fits in memory */
    spoolFrames(r, pFile, fd);
    return r;
  }
  pBlock = ws_mem_new(sizeof(WsBlock) + (uint64_t)n);
  if (pBlock && readAt(pFile, fd, (unsigned char *)(pBlock + 1), n, frameOffset(r))) {
    ws_mem_free(pBlock);
    pBlock = 0;
  }
  if (pBlock) pBlock->nRef = nRec;
  for (i = 1;; i++, r = r->next) {
    if (pBlock) {
      r->pBlock = pBlock;
      r->aFrames = (unsigned char *)(pBlock + 1) + at;
      at += frameBytes(r);
    }
    if (i == nRec) return r;
  }
}

/* claimRun() and readClaimed() in one, where nothing else touches the list:
** sets *pnRec to how many commits were read and returns the last of them. */
static ws_rec *readRun(ws_rec *r, sqlite3_file *pFile, int fd, uint32_t *pnRec) {
  sqlite3_int64 n;
  *pnRec = claimRun(r, &n);
  return readClaimed(r, *pnRec, n, pFile, fd);
}

/* n of pDb's queued commits have their frames in memory now: wake writers in
** waitConsumed() when they were the last. */
static void commitsRead(WsDb *pDb, uint32_t n) {
  if (__atomic_sub_fetch(&pDb->nPending, (int)n, __ATOMIC_ACQ_REL) == 0) {
    pthread_mutex_lock(&gMutex);
    if (__atomic_load_n(&pDb->nPending, __ATOMIC_ACQUIRE) == 0) readTo(pDb);
    if (pDb->nWaiter) pthread_cond_broadcast(&gDone);
    pthread_mutex_unlock(&gMutex);
  }
}

/* Read the frames of pDb's queued commits nobody has read yet, through pWal
** or fd (gMutex held). */
static void readQueued(WsDb *pDb, sqlite3_file *pWal, int fd) {
  ws_rec *r;
  uint32_t n;
  for (r = gHead; r; r = r->next) {
    if (unreadCommit(r, pDb)) {
      r = readRun(r, pWal, fd, &n);
      __atomic_sub_fetch(&pDb->nPending, (int)n, __ATOMIC_ACQ_REL);
    }
  }
  if (__atomic_load_n(&pDb->nPending, __ATOMIC_ACQUIRE) == 0) readTo(pDb);
}

/* The consumer's descriptor for pDb's WAL (-1 if it cannot be opened): closed
** when the WAL may be another file now, opened again if bOpen. */
static int consumerWal(WsDb *pDb, int bOpen) {
  if (__atomic_exchange_n(&pDb->bReopen, 0, __ATOMIC_ACQ_REL) && pDb->walFd >= 0) {
    close(pDb->walFd);
    pDb->walFd = -1;
  }
  if (pDb->walFd < 0 && bOpen) {
    char *zWal = sqlite3_mprintf("%s-wal", pDb->zPath);
    /* No atime updates: the WAL changes all the time, so under relatime every read
    ** would otherwise cost a journaled inode update.  O_NOATIME needs the file's owner. */
    if (zWal) pDb->walFd = open(zWal, O_RDONLY | O_CLOEXEC | O_NOATIME);
    if (zWal && pDb->walFd < 0 && errno == EPERM) pDb->walFd = open(zWal, O_RDONLY | O_CLOEXEC);
    sqlite3_free(zWal);
  }
  return pDb->walFd;
}

/* Consumer side of a COMMIT whose frames are read (readDetached): verify that
** they continue the chain and end at the checksum the writer saw, and index
** the newest version of every page still inside the database.  Anything
** else (the WAL was rewritten by someone else, a read failed) turns the
** record into a GAP, and the consumer resyncs. */
static void prepareCommit(ws_rec *r) {
  WsDb *pDb = r->pDb;
  const WsChain *c = &r->chain;
  uint32_t n = r->frame_end - r->frame_start, szFrame = FRAME_HDR + c->szPage;
  uint32_t ck[2], k, j, m, nChunk, nRef = 0, nPage = 0, lastSize = 0;
  const unsigned char *aF;
  unsigned char *aBuf = 0;
  PageRef *aRef = 0;
  consumerWal(pDb, 0); /* lets go of a WAL that was replaced */
  if (!r->aFrames && r->spool_fd < 0) goto gap; /* its read failed (readDetached) */
  aF = r->aFrames;
  /* PageRefs, then pointers to the pages (in memory) or their frames (spooled),
  ** then the page numbers: one block. */
  aRef = malloc((sizeof(PageRef) + sizeof(uint32_t) + (aF ? sizeof(unsigned char *) : sizeof(uint32_t))) * n);
  if (!aRef) goto gap;
  /* Spooled frames are verified a chunk at a time. */
  nChunk = aF ? n : (uint32_t)(WS_CHUNK / szFrame > 0 ? WS_CHUNK / szFrame : 1);
  aBuf = aF ? 0 : malloc((size_t)nChunk * szFrame);
  if (!aF && !aBuf) goto gap;
  ck[0] = c->cksum[0];
  ck[1] = c->cksum[1];
  for (k = 0; k < n; k += m) {
    const unsigned char *aChunk = aF ? aF + (sqlite3_int64)k * szFrame : aBuf;
    m = n - k < nChunk ? n - k : nChunk;
    if (!aF && preadFull(r->spool_fd, aBuf, (sqlite3_int64)m * szFrame, (sqlite3_int64)k * szFrame)) {
      goto gap;
    }
    for (j = 0; j < m; j++) {
      const unsigned char *h = aChunk + (sqlite3_int64)j * szFrame;
      uint32_t pg = get32(h);
      if (!frameValid(c, h, ck)) goto gap;
      lastSize = get32(h + 4);
      if (pg <= r->db_size) {
        aRef[nRef].pgno = pg;
        aRef[nRef].iFrame = k + j;
        nRef++;
      }
    }
  }
  free(aBuf);
  aBuf = 0;
  if (ck[0] != r->endCk[0] || ck[1] != r->endCk[1] || lastSize != r->db_size) goto gap;
  qsort(aRef, nRef, sizeof(PageRef), cmpPageRef);
  for (k = 0; k < nRef; k++) {
    if (k + 1 < nRef && aRef[k + 1].pgno == aRef[k].pgno) continue;
    aRef[nPage++] = aRef[k];
  }
  if (aF) {
    r->pages = (unsigned char **)(aRef + n);
    r->pgnos = (uint32_t *)(r->pages + n);
  } else {
    r->frames = (uint32_t *)(aRef + n);
    r->pgnos = r->frames + n;
  }
  for (k = 0; k < nPage; k++) {
    r->pgnos[k] = aRef[k].pgno;
    if (aF) r->pages[k] = (unsigned char *)aF + (sqlite3_int64)aRef[k].iFrame * szFrame + FRAME_HDR;
    else r->frames[k] = aRef[k].iFrame;
  }
  r->npages = nPage;
  r->pIndex = aRef;
  return;
gap: /* every jump here comes after the read above */
  free(aBuf);
  free(aRef);
  r->pages = 0;
  r->frames = 0;
  releaseFrames(r);
  if (r->spool_fd >= 0) close(r->spool_fd);
  r->spool_fd = -1;
  r->kind = WS_GAP;
}

/*
** SQLite is about to overwrite, truncate or delete the WAL: the frames of
** pDb's queued commits must be in memory first.  With pWal (the writer's own
** WAL handle, at a restart or truncate) the writer reads those still in the
** queue itself, which costs it one read per restart instead of a wait for
** the consumer thread to be scheduled.  Then it waits for the ones the
** consumer is reading right now.  The wait is bounded: a stalled consumer is
** no reason to stall the application; its reads then fail the chain check
** and it resyncs.
*/
static void waitConsumed(WsDb *pDb, sqlite3_file *pWal) {
  struct timespec ts;
  if (!pDb || __atomic_load_n(&pDb->nPending, __ATOMIC_ACQUIRE) == 0) return;
  pthread_mutex_lock(&gMutex);
  if (pWal) readQueued(pDb, pWal, -1);
  if (__atomic_load_n(&pDb->nPending, __ATOMIC_ACQUIRE) == 0) { /* the consumer lingers on */
    pthread_mutex_unlock(&gMutex);
    return;
  }
  ts = deadlineIn(2000000000);
  pDb->nWaiter++;
  gWake = 1; /* a lingering consumer goes on at once */
  pthread_cond_broadcast(&gCond);
  while (__atomic_load_n(&pDb->nPending, __ATOMIC_ACQUIRE) > 0) {
    if (pthread_cond_timedwait(&gDone, &gMutex, &ts) == ETIMEDOUT) break;
  }
  pDb->nWaiter--;
  pthread_mutex_unlock(&gMutex);
}

/* The WAL is being deleted, or the database's last connection closes: once
** the consumer has read everything queued, close its descriptor (a deleted
** WAL's space is only freed then; the next commit opens the new WAL).  The
** consumer touches walFd only while one of the db's commits is pending. */
static void releaseWal(WsDb *pDb) {
  waitConsumed(pDb, 0);
  if (pDb->walFd >= 0 && __atomic_load_n(&pDb->nPending, __ATOMIC_ACQUIRE) == 0) {
    close(pDb->walFd);
    pDb->walFd = -1;
  }
}

/*
** A WAL header is about to be written at offset 0: the WAL restarts.  SQLite
** restarts only a fully checkpointed WAL, so every frame in it must have been
** ours.  Read the old WAL before it is overwritten: a valid commit frame past
** our position, a different header, or a WAL that vanished without one of our
** connections truncating it, all mean another writer committed transactions
** (and checkpointed them) that the stream never saw.
*/
static void checkRestart(WsFile *pWal) {
  WsDb *pDb = pWal->pDb;
  sqlite3_file *r = pWal->pReal;
  sqlite3_int64 size = 0, off;
  unsigned char h[WAL_HDR], *aFrame;
  WsChain old;
  uint32_t ck[2], szFrame;
  if (!pDb || !pDb->c.bKnown) return;
  if (r->pMethods->xFileSize(r, &size) != SQLITE_OK) size = 0;
  if (size < WAL_HDR || r->pMethods->xRead(r, h, WAL_HDR, 0) != SQLITE_OK || !parseWalHeader(&old, h)) {
    /* Emptied by a TRUNCATE checkpoint: ours, or another process's once the
    ** leader had read every frame. */
    uint32_t s1, s2, mx, ic;
    int bShm, bCounter;
    if (!pDb->c.bHdr || pDb->c.nTrunc) return;
    bShm = shmHeader(pDb, &s1, &s2, &mx, &ic);
    bCounter = bShm && pDb->c.bChange;
    if (!(bShm && (permitted(pDb, s1, s2) || (bCounter && ic == pDb->c.iChange)))) {
      /* The commit counter says how many commits it erased unread. */
      reportGapOf(pDb, bCounter ? commitsCounted(pDb->c.iChange, ic) : 0);
    }
    return;
  }
  if (!pDb->c.bHdr || old.salt1 != pDb->c.salt1 || old.salt2 != pDb->c.salt2) {
    /* A header we never saw: frames under it are foreign unless there are none. */
    old.nFrame = 0;
  } else {
    old = pDb->c;
  }
  szFrame = FRAME_HDR + old.szPage;
  aFrame = malloc(szFrame);
  if (!aFrame) return;
  ck[0] = old.cksum[0];
  ck[1] = old.cksum[1];
  for (off = WAL_HDR + (sqlite3_int64)old.nFrame * szFrame; off + szFrame <= size; off += szFrame) {
    if (r->pMethods->xRead(r, aFrame, (int)szFrame, off) != SQLITE_OK) break;
    if (!frameValid(&old, aFrame, ck)) break;
    if (get32(aFrame + 4)) {
      reportGap(pDb);
      break;
    }
  }
  free(aFrame);
}

/* The page size of the frames being mirrored: from the header in the mirror
** if the WAL restarts in it, else from the chain; 0 if not known. */
static uint32_t mirrorPageSize(const WsDb *p) {
  if (p->iStart == 0 && p->nBuf >= WAL_HDR) {
    uint32_t sz = get32(p->aWalHdr + 8);
    sz = sz == 1 ? 65536 : sz;
    return sz >= 512 && sz <= 65536 && !(sz & (sz - 1)) ? sz : 0;
  }
  return p->c.bHdr ? p->c.szPage : 0;
}

/* Start the mirror afresh at WAL offset iOfst. */
static void mirrorReset(WsDb *p, sqlite3_int64 iOfst) {
  if (p->nFh) memset(p->aFh, 0, (size_t)p->nFh * FRAME_HDR);
  p->iStart = iOfst;
  p->nBuf = 0;
  p->nFh = 0;
  p->szMirror = 0;
  p->bLost = 0;
}

/* Room for n frame headers; 0 if the memory cannot be had. */
static int mirrorRoom(WsDb *p, uint32_t n) {
  uint32_t m = p->nFhAlloc ? p->nFhAlloc : 256;
  unsigned char *a;
  if (n <= p->nFhAlloc) return 1;
  while (m < n) {
    if (m > UINT32_MAX / 2) return 0;
    m *= 2;
  }
  a = realloc(p->aFh, (size_t)m * FRAME_HDR);
  if (!a) return 0;
  memset(a + (size_t)p->nFhAlloc * FRAME_HDR, 0, (size_t)(m - p->nFhAlloc) * FRAME_HDR);
  p->aFh = a;
  p->nFhAlloc = m;
  return 1;
}

/* Note a WAL write in the mirror: the bytes that fall on the WAL header or on
** a frame header are kept, page bytes only extend the mirror.  Writes may cut
** anywhere (SQLite splits them at sector boundaries under synchronous=FULL).
** What cannot be kept (no memory, an unknown page size) makes the next publish
** a gap: the write itself has succeeded and the application never sees an
** error from here. */
static void mirrorWrite(WsDb *p, const void *z, int iAmt, sqlite3_int64 iOfst) {
  const unsigned char *a = z;
  sqlite3_int64 end = iOfst + iAmt, szFrame, k, h;
  if (p->nBuf == 0 || iOfst == 0 || iOfst < p->iStart) {
    /* Writes below the mirror start are not produced by SQLite's WAL writer;
    ** restart the mirror so the chain check reports the inconsistency. */
    mirrorReset(p, iOfst);
  }
  if (p->iStart == 0 && iOfst < WAL_HDR) {
    memcpy(p->aWalHdr + iOfst, a, (size_t)((end < WAL_HDR ? end : WAL_HDR) - iOfst));
  }
  if (end - p->iStart > p->nBuf) p->nBuf = end - p->iStart;
  if (end <= WAL_HDR || p->bLost) return;
  if (!p->szMirror) {
    p->szMirror = mirrorPageSize(p);
    if (!p->szMirror) {
      p->bLost = 1;
      return;
    }
    p->fBase = p->iStart <= WAL_HDR ? 0 : (uint32_t)((p->iStart - WAL_HDR) / (FRAME_HDR + p->szMirror));
  }
  szFrame = FRAME_HDR + p->szMirror;
  for (k = iOfst <= WAL_HDR ? 0 : (iOfst - WAL_HDR) / szFrame; (h = WAL_HDR + k * szFrame) < end; k++) {
    sqlite3_int64 lo = h > iOfst ? h : iOfst, hi = h + FRAME_HDR < end ? h + FRAME_HDR : end;
    if (lo >= hi) continue; /* only page bytes of frame k */
    if (k < p->fBase || k - p->fBase >= UINT32_MAX || !mirrorRoom(p, (uint32_t)(k - p->fBase) + 1)) {
      p->bLost = 1;
      return;
    }
    memcpy(p->aFh + (size_t)(k - p->fBase) * FRAME_HDR + (lo - h), a + (lo - iOfst), (size_t)(hi - lo));
    if ((uint32_t)(k - p->fBase) + 1 > p->nFh) p->nFh = (uint32_t)(k - p->fBase) + 1;
  }
}

/* After a publish, give back a mirror grown by a big transaction. */
static void mirrorTrim(WsDb *p) {
  if ((size_t)p->nFhAlloc * FRAME_HDR > (1 << 20)) {
    free(p->aFh);
    p->aFh = 0;
    p->nFhAlloc = p->nFh = 0;
  }
}

static void publishFromMain(WsFile *pMain) {
  WsDb *pDb = pMain->pDb;
  if (pDb && pDb->nBuf) {
    publishPending(pDb);
    mirrorTrim(pDb);
  }
}

/* ------------------------------------------------- exclusive locking mode
**
** A connection in locking_mode=EXCLUSIVE keeps its EXCLUSIVE lock on the
** database file after each commit, which keeps the engine's own connections
** (and every other process) out for as long as it stays open.  The PRAGMA is
** refused on a replicated database (wsFileControl), but an ATTACH takes the
** mode from its connection's main database without asking.  An application's
** main file that still holds EXCLUSIVE after a commit, or holds it at all while
** the database is in WAL mode (SQLite takes it there only in that mode, or for
** a moment at the last close), tells the engine why its sync point cannot get
** in (ws_app_exclusive_ns()).
*/
#define WS_EXCL_ANY 0    /* holds EXCLUSIVE */
#define WS_EXCL_KEPT 1   /* ... past a commit */
#define WS_EXCL_HELD 2   /* holds any lock (in rollback mode, EXCLUSIVE keeps a read's) */

static void exclNote(WsFile *p, int kind, int bOn) {
  if (!p->pDb || !p->bApp || p->bExcl[kind] == bOn) return;
  pthread_mutex_lock(&gMutex);
  p->bExcl[kind] = bOn;
  if (bOn && p->pDb->nExcl[kind]++ == 0) p->pDb->exclSinceNs[kind] = monotonicNs();
  if (!bOn) p->pDb->nExcl[kind]--;
  pthread_mutex_unlock(&gMutex);
}

static void exclNone(WsFile *p) {
  exclNote(p, WS_EXCL_ANY, 0);
  exclNote(p, WS_EXCL_KEPT, 0);
  exclNote(p, WS_EXCL_HELD, 0);
}

/* ------------------------------------------------------------ io methods */

static void engineWants(WsFile *p, int bOn);

static int wsClose(sqlite3_file *pFile) {
  WsFile *p = (WsFile *)pFile;
  int rc;
  if (p->bEng) { /* its links change as its neighbours close: only read under gMutex */
    if (p->bEngWrite) engineWants(p, 0); /* it gave up on the write lock */
    pthread_mutex_lock(&gMutex);
    engFileGone(p);
    pthread_mutex_unlock(&gMutex);
  }
  if (p->eType == WSF_WAL) {
    waitConsumed(p->pDb, p->pReal); /* SQLite may delete the WAL next */
    if (p->bAppWal) {
      pthread_mutex_lock(&gMutex);
      p->pDb->nAppWal--;
      pthread_mutex_unlock(&gMutex);
    }
  } else if (p->eType == WSF_MAIN && p->pDb) {
    int bLast;
    exclNone(p);
    pthread_mutex_lock(&gMutex);
    bLast = (--p->pDb->nRef == 0);
    p->pDb->nApp -= p->bApp;
    p->pDb->nAppRw -= p->bAppRw;
    p->pDb->nAppNoLock -= p->bAppNoLock;
    pthread_mutex_unlock(&gMutex);
    if (bLast) {
      /* Nobody holds the db now; another process may change it before the
      ** next open, which therefore starts from a fresh sync point. */
      pthread_mutex_lock(&p->pDb->mu);
      p->pDb->c.bKnown = 0;
      p->pDb->nBuf = 0;
      p->pDb->nFhAlloc = p->pDb->nFh = 0;
      free(p->pDb->aFh);
      p->pDb->aFh = 0;
      pthread_mutex_unlock(&p->pDb->mu);
      releaseWal(p->pDb);
      publishEvent(p->pDb, WS_CLOSE, 0, 0);
    }
  }
  rc = p->pReal->pMethods ? p->pReal->pMethods->xClose(p->pReal) : SQLITE_OK;
  return rc;
}

static int wsRead(sqlite3_file *f, void *z, int n, sqlite3_int64 o) {
  sqlite3_file *r = ((WsFile *)f)->pReal;
  return r->pMethods->xRead(r, z, n, o);
}

static int wsWrite(sqlite3_file *f, const void *z, int n, sqlite3_int64 o) {
  WsFile *p = (WsFile *)f;
  int rc;
  if (p->eType == WSF_WAL && o == 0) {
    waitConsumed(p->pDb, p->pReal);
    if (p->pDb) {
      pthread_mutex_lock(&p->pDb->mu);
      checkRestart(p);
      if (n >= WAL_HDR) headerWritten(p->pDb, z);
      pthread_mutex_unlock(&p->pDb->mu);
    }
  }
  rc = p->pReal->pMethods->xWrite(p->pReal, z, n, o);
  if (rc != SQLITE_OK) return rc;
  if (p->eType == WSF_WAL) {
    if (p->pDb) mirrorWrite(p->pDb, z, n, o);
    return rc;
  }
  if (p->eType == WSF_MAIN && !p->bInCkpt && p->pDb && p->pDb->c.bKnown) reportGap(p->pDb);
  return rc;
}

static int wsTruncate(sqlite3_file *f, sqlite3_int64 size) {
  WsFile *p = (WsFile *)f;
  int rc;
  if (p->eType == WSF_WAL) waitConsumed(p->pDb, p->pReal);
  rc = p->pReal->pMethods->xTruncate(p->pReal, size);
  /* A TRUNCATE checkpoint: it stepped salt-1 and the next header lands in an
  ** empty file legitimately. */
  if (rc == SQLITE_OK && size == 0 && p->eType == WSF_WAL && p->pDb) {
    pthread_mutex_lock(&p->pDb->mu);
    p->pDb->c.nTrunc++;
    pthread_mutex_unlock(&p->pDb->mu);
  }
  return rc;
}

static int wsSync(sqlite3_file *f, int flags) {
  sqlite3_file *r = ((WsFile *)f)->pReal;
  return r->pMethods->xSync(r, flags);
}

static int wsFileSize(sqlite3_file *f, sqlite3_int64 *pSize) {
  sqlite3_file *r = ((WsFile *)f)->pReal;
  return r->pMethods->xFileSize(r, pSize);
}

static int wsLock(sqlite3_file *f, int e) {
  WsFile *p = (WsFile *)f;
  int rc = p->pReal->pMethods->xLock(p->pReal, e);
  if (rc == SQLITE_OK) {
    p->eLock = e;
    if (e == SQLITE_LOCK_EXCLUSIVE) exclNote(p, WS_EXCL_ANY, 1);
    exclNote(p, WS_EXCL_HELD, 1);
  }
  return rc;
}

static int wsUnlock(sqlite3_file *f, int e) {
  WsFile *p = (WsFile *)f;
  int rc = p->pReal->pMethods->xUnlock(p->pReal, e);
  if (rc == SQLITE_OK) {
    p->eLock = e;
    if (e < SQLITE_LOCK_EXCLUSIVE) {
      exclNote(p, WS_EXCL_ANY, 0);
      exclNote(p, WS_EXCL_KEPT, 0);
    }
    if (e == SQLITE_LOCK_NONE) exclNote(p, WS_EXCL_HELD, 0);
  }
  return rc;
}

static int wsCheckReservedLock(sqlite3_file *f, int *pOut) {
  sqlite3_file *r = ((WsFile *)f)->pReal;
  return r->pMethods->xCheckReservedLock(r, pOut);
}

static int wsFileControl(sqlite3_file *f, int op, void *pArg) {
  WsFile *p = (WsFile *)f;
  int rc;
  if (p->eType == WSF_MAIN) {
    switch (op) {
      case SQLITE_FCNTL_CKPT_START:
        /* A WAL restart may follow: have the consumer read queued frames now,
        ** while the checkpoint runs, rather than the writer at the restart. */
        p->bInCkpt = 1;
        exclNote(p, WS_EXCL_ANY, 0); /* the last close's checkpoint, not a locking mode */
        if (p->pDb && __atomic_load_n(&p->pDb->nPending, __ATOMIC_ACQUIRE)) ws_wake();
        break;
      case SQLITE_FCNTL_CKPT_DONE: p->bInCkpt = 0; break;
      case SQLITE_FCNTL_COMMIT_PHASETWO:
        publishFromMain(p);
        if (p->eLock == SQLITE_LOCK_EXCLUSIVE) exclNote(p, WS_EXCL_KEPT, 1); /* until unlocked */
        break;
      case SQLITE_FCNTL_PRAGMA: {
        /* Exclusive locking hides the database from every other connection: the
        ** engine's sync points and the other processes' replicator among them. */
        char **az = (char **)pArg;
        if (p->pDb && az[1] && az[2] && sqlite3_stricmp(az[1], "locking_mode") == 0 &&
            sqlite3_stricmp(az[2], "exclusive") == 0) {
          az[0] = sqlite3_mprintf(
              "walsync: locking_mode=EXCLUSIVE would stop replication (the replicator reads "
              "through connections of its own); keep locking_mode=NORMAL");
          return SQLITE_ERROR;
        }
        break;
      }
      case WS_FCNTL_DB_ID:
        *(int64_t *)pArg = p->pDb ? p->pDb->id : 0;
        return SQLITE_OK;
      case SQLITE_FCNTL_VFSNAME:
        rc = p->pReal->pMethods->xFileControl(p->pReal, op, pArg);
        if (rc == SQLITE_OK) {
          *(char **)pArg = sqlite3_mprintf(WS_VFS_NAME "/%z", *(char **)pArg);
        }
        return rc;
    }
  }
  return p->pReal->pMethods->xFileControl(p->pReal, op, pArg);
}

static int wsSectorSize(sqlite3_file *f) {
  sqlite3_file *r = ((WsFile *)f)->pReal;
  return r->pMethods->xSectorSize(r);
}

static int wsDeviceCharacteristics(sqlite3_file *f) {
  sqlite3_file *r = ((WsFile *)f)->pReal;
  return r->pMethods->xDeviceCharacteristics(r);
}

static int wsShmMap(sqlite3_file *f, int i, int sz, int bExtend, void volatile **pp) {
  WsFile *p = (WsFile *)f;
  int rc = p->pReal->pMethods->xShmMap(p->pReal, i, sz, bExtend, pp);
  /* The wal-index header, for ws_tail() and the restart check: valid while
  ** any connection of this process has it mapped. */
  if (rc == SQLITE_OK && i == 0 && *pp && p->eType == WSF_MAIN && p->pDb && !p->bShm) {
    pthread_mutex_lock(&p->pDb->mu);
    p->bShm = 1;
    p->pDb->nShm++;
    p->pDb->pShm = *pp;
    pthread_mutex_unlock(&p->pDb->mu);
  }
  return rc;
}

/* Lock offsets in the wal-index (see wal.c): 0 = write lock, 3+i = read lock i. */
#define WAL_WRITE_LOCK 0
#define WAL_READ_LOCK1 4
#define WAL_NREADER_1 4

/* Take or release wal-index locks, noting which are held: a child forked while
** the engine held some lets go of them (forkLetGo). */
static int shmLockNoted(WsFile *p, int ofst, int n, int flags) {
  int rc = p->pReal->pMethods->xShmLock(p->pReal, ofst, n, flags);
  uint32_t bits = ((1u << n) - 1) << ofst;
  if (rc != SQLITE_OK) return rc;
  if (flags & SQLITE_SHM_UNLOCK) {
    p->shmShared &= ~bits;
    p->shmExcl &= ~bits;
  } else if (flags & SQLITE_SHM_EXCLUSIVE) {
    p->shmExcl |= bits;
  } else {
    p->shmShared |= bits;
  }
  return rc;
}

/* Engine connections wanting the write lock, all databases: read by every
** application transaction, written only around a sync point, so it gets a
** cache line of its own (beside the queue's counters a writer would fetch it
** from the other core at every commit). */
static struct {
  _Alignas(64) int n;
  char pad[64 - sizeof(int)];
} gEngWriting;

/* The engine's connections (sync points) go first to the WAL write lock.
** Taken in a moment between two transactions of a writer committing flat out,
** it could wait for the whole burst (SQLite's busy handler only retries now
** and then), and commits made meanwhile after a gap would all end up inside
** the sync point's snapshot, without restore points of their own.  So while
** an engine connection wants or holds it, this process's application writers
** wait before taking it, at most WS_ENGINE_FIRST_NS: one whose own other
** connection holds it would otherwise wait for ever. */
static void engineWants(WsFile *p, int bOn) {
  pthread_mutex_lock(&gMutex);
  if (p->bEngWrite != bOn) {
    p->bEngWrite = bOn;
    p->pDb->nEngWrite += bOn ? 1 : -1;
    __atomic_add_fetch(&gEngWriting.n, bOn ? 1 : -1, __ATOMIC_RELEASE);
    if (!bOn) pthread_cond_broadcast(&gEngWrite);
  }
  pthread_mutex_unlock(&gMutex);
}

static void engineFirst(WsDb *pDb) {
  struct timespec ts;
  if (!__atomic_load_n(&gEngWriting.n, __ATOMIC_ACQUIRE)) return;
  ts = deadlineIn(WS_ENGINE_FIRST_NS);
  pthread_mutex_lock(&gMutex);
  while (pDb->nEngWrite > 0) {
    if (pthread_cond_timedwait(&gEngWrite, &gMutex, &ts) == ETIMEDOUT) break;
  }
  pthread_mutex_unlock(&gMutex);
}

/* Releasing the WAL write lock ends a write transaction: publish first.  An
** exclusive lock on read locks 1..4 together is taken only to restart the
** WAL (walRestartLog, TRUNCATE checkpoints); refuse it with SQLITE_BUSY
** while a raw snapshot reads the WAL -- SQLite then simply appends. */
static int wsShmLock(sqlite3_file *f, int ofst, int n, int flags) {
  WsFile *p = (WsFile *)f;
  if (p->eType == WSF_MAIN && (flags & SQLITE_SHM_EXCLUSIVE)) {
    if (ofst == WAL_WRITE_LOCK && (flags & SQLITE_SHM_UNLOCK)) {
      int rc;
      publishFromMain(p);
      rc = shmLockNoted(p, ofst, n, flags);
      if (p->bEngWrite) engineWants(p, 0);
      return rc;
    } else if (ofst == WAL_WRITE_LOCK && p->pDb) {
      int rc;
      if (!p->bEng) {
        engineFirst(p->pDb);
        return shmLockNoted(p, ofst, n, flags);
      }
      rc = shmLockNoted(p, ofst, n, flags);
      engineWants(p, 1); /* refused: its busy handler tries again soon; taken: until its unlock */
      return rc;
    } else if (ofst == WAL_READ_LOCK1 && n == WAL_NREADER_1 && (flags & SQLITE_SHM_LOCK) && p->pDb) {
      int rc;
      if (__atomic_load_n(&p->pDb->nHold, __ATOMIC_ACQUIRE) > 0 || !restartAllowed(p->pDb)) {
        return SQLITE_BUSY;
      }
      /* Our own pin would refuse it; the restart reads unread frames first
      ** (waitConsumed()), and holding this lock keeps everyone else out. */
      pthread_mutex_lock(&gMutex);
      pinDrop(p->pDb);
      rc = shmLockNoted(p, ofst, n, flags);
      if (rc != SQLITE_OK && __atomic_load_n(&p->pDb->nPending, __ATOMIC_ACQUIRE) > 0) {
        pinFrames(p->pDb);
      }
      pthread_mutex_unlock(&gMutex);
      if (rc == SQLITE_OK) restartBegin(p);
      return rc;
    } else if (ofst == WAL_READ_LOCK1 && n == WAL_NREADER_1 && (flags & SQLITE_SHM_UNLOCK) && p->pDb) {
      restartDone(p);
    }
  }
  return shmLockNoted(p, ofst, n, flags);
}

static void wsShmBarrier(sqlite3_file *f) {
  sqlite3_file *r = ((WsFile *)f)->pReal;
  r->pMethods->xShmBarrier(r);
}

static int wsShmUnmap(sqlite3_file *f, int deleteFlag) {
  WsFile *p = (WsFile *)f;
  if (p->bShm) { /* forget the mapping before it goes: ws_tail() reads it under mu */
    pthread_mutex_lock(&p->pDb->mu);
    p->bShm = 0;
    if (p->pDb->nShm > 0 && --p->pDb->nShm == 0) {
      p->pDb->pShm = 0;
      pthread_mutex_lock(&gMutex);
      pinClose(p->pDb);
      pthread_mutex_unlock(&gMutex);
    }
    pthread_mutex_unlock(&p->pDb->mu);
  }
  return p->pReal->pMethods->xShmUnmap(p->pReal, deleteFlag);
}

static int wsFetch(sqlite3_file *f, sqlite3_int64 o, int n, void **pp) {
  sqlite3_file *r = ((WsFile *)f)->pReal;
  return r->pMethods->xFetch(r, o, n, pp);
}

static int wsUnfetch(sqlite3_file *f, sqlite3_int64 o, void *pPage) {
  sqlite3_file *r = ((WsFile *)f)->pReal;
  return r->pMethods->xUnfetch(r, o, pPage);
}

static const sqlite3_io_methods ws_io_methods = {
    3,
    wsClose, wsRead, wsWrite, wsTruncate, wsSync, wsFileSize, wsLock, wsUnlock,
    wsCheckReservedLock, wsFileControl, wsSectorSize, wsDeviceCharacteristics,
    wsShmMap, wsShmLock, wsShmBarrier, wsShmUnmap, wsFetch, wsUnfetch,
};

/* A file of the engine's that a forked child let go of (forkLetGo): its lower
** file is closed, so every method fails or does nothing. */
static int fkClose(sqlite3_file *f) { (void)f; return SQLITE_OK; }
static int fkRead(sqlite3_file *f, void *z, int n, sqlite3_int64 o) { (void)f; (void)z; (void)n; (void)o; return SQLITE_IOERR_READ; }
static int fkWrite(sqlite3_file *f, const void *z, int n, sqlite3_int64 o) { (void)f; (void)z; (void)n; (void)o; return SQLITE_IOERR_WRITE; }
static int fkTruncate(sqlite3_file *f, sqlite3_int64 n) { (void)f; (void)n; return SQLITE_IOERR_TRUNCATE; }
static int fkSync(sqlite3_file *f, int flags) { (void)f; (void)flags; return SQLITE_IOERR_FSYNC; }
static int fkFileSize(sqlite3_file *f, sqlite3_int64 *pn) { (void)f; *pn = 0; return SQLITE_IOERR_FSTAT; }
static int fkLock(sqlite3_file *f, int e) { (void)f; (void)e; return SQLITE_BUSY; }
static int fkUnlock(sqlite3_file *f, int e) { (void)f; (void)e; return SQLITE_OK; }
static int fkReserved(sqlite3_file *f, int *pOut) { (void)f; *pOut = 0; return SQLITE_OK; }
static int fkFileControl(sqlite3_file *f, int op, void *a) { (void)f; (void)op; (void)a; return SQLITE_NOTFOUND; }
static int fkSectorSize(sqlite3_file *f) { (void)f; return 4096; }
static int fkCharacteristics(sqlite3_file *f) { (void)f; return 0; }
static int fkShmMap(sqlite3_file *f, int i, int sz, int b, void volatile **pp) { (void)f; (void)i; (void)sz; (void)b; *pp = 0; return SQLITE_IOERR_SHMMAP; }
static int fkShmLock(sqlite3_file *f, int o, int n, int flags) { (void)f; (void)o; (void)n; return (flags & SQLITE_SHM_UNLOCK) ? SQLITE_OK : SQLITE_BUSY; }
static void fkShmBarrier(sqlite3_file *f) { (void)f; }
static int fkShmUnmap(sqlite3_file *f, int d) { (void)f; (void)d; return SQLITE_OK; }
static int fkFetch(sqlite3_file *f, sqlite3_int64 o, int n, void **pp) { (void)f; (void)o; (void)n; *pp = 0; return SQLITE_OK; }
static int fkUnfetch(sqlite3_file *f, sqlite3_int64 o, void *p) { (void)f; (void)o; (void)p; return SQLITE_OK; }

static const sqlite3_io_methods ws_forked_methods = {
    3,
    fkClose, fkRead, fkWrite, fkTruncate, fkSync, fkFileSize, fkLock, fkUnlock,
    fkReserved, fkFileControl, fkSectorSize, fkCharacteristics,
    fkShmMap, fkShmLock, fkShmBarrier, fkShmUnmap, fkFetch, fkUnfetch,
};

/* ----------------------------------------------------------- vfs methods */

/* Called after a database's first open in this process publishes its OPEN:
** Python starts its consumer then, whether or not an apsw connection hook
** ran (an application may clear apsw.connection_hooks). */
static void (*gOnOpen)(void) = 0;

void ws_on_open(void (*cb)(void)) { __atomic_store_n(&gOnOpen, cb, __ATOMIC_RELEASE); }

/* Find or create the WsDb for a main-db path and take a reference. */
static WsDb *dbAcquire(const char *zPath) {
  WsDb *pDb = 0;
  int64_t i;
  int bOpened = 0;
  pthread_mutex_lock(&gMutex);
  for (i = 0; i < gnDb; i++) {
    if (strcmp(gaDb[i]->zPath, zPath) == 0) {
      pDb = gaDb[i];
      break;
    }
  }
  if (!pDb) {
    if (gnDb == gnDbAlloc) {
      int64_t n = gnDbAlloc ? gnDbAlloc * 2 : 64;
      WsDb **aNew = realloc(gaDb, sizeof(WsDb *) * (size_t)n);
      if (!aNew) goto out;
      gaDb = aNew;
      gnDbAlloc = n;
    }
    pDb = calloc(1, sizeof(*pDb) + strlen(zPath) + 1);
    if (!pDb) goto out;
    pDb->zPath = (char *)(pDb + 1);
    strcpy(pDb->zPath, zPath);
    pDb->id = gnDb + 1;
    pDb->walFd = -1;
    {
      pthread_mutexattr_t ma;
      pthread_mutexattr_init(&ma);
      pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
      pthread_mutex_init(&pDb->mu, &ma);
      pthread_mutexattr_destroy(&ma);
    }
    pDb->pShared = sharedMap(zPath);
    gaDb[gnDb++] = pDb;
  }
  bOpened = (pDb->nRef++ == 0);
out:
  pthread_mutex_unlock(&gMutex);
  if (bOpened) {
    void (*cb)(void) = __atomic_load_n(&gOnOpen, __ATOMIC_ACQUIRE);
    publishEvent(pDb, WS_OPEN, zPath, 0);
    if (cb) cb();
  }
  return pDb;
}

static WsDb *dbByWal(const char *zWal);

/* Main databases and their WALs are tracked by name only: a VFS stacked on this
** one hands xOpen names that are not the pager's, so nothing may be derived
** from the name pointer itself (sqlite3_database_file_object() reads the
** memory before it).  Nameless files (temporary and in-memory databases) and
** delete-on-close files pass straight through. */
static int wsOpen(sqlite3_vfs *pVfs, sqlite3_filename zName, sqlite3_file *pFile, int flags, int *pOutFlags) {
  WsFile *p = (WsFile *)pFile;
  sqlite3_vfs *pOrig = ORIGVFS(pVfs);
  int rc;
  memset(p, 0, sizeof(*p));
  p->pReal = (sqlite3_file *)&p[1];
  rc = pOrig->xOpen(pOrig, zName, p->pReal, flags, pOutFlags);
  if (rc != SQLITE_OK) {
    p->base.pMethods = 0;
    return rc;
  }
  p->base.pMethods = &ws_io_methods;
  if (!zName || !zName[0] || (flags & SQLITE_OPEN_DELETEONCLOSE)) return SQLITE_OK;
  if (flags & SQLITE_OPEN_MAIN_DB) {
    p->eType = WSF_MAIN;
    p->pDb = dbAcquire(zName);
    if (p->pDb && !tEngineOpen) {
      /* Read-only (mode=ro, a file it cannot write, immutable=1): it commits nothing. */
      p->bApp = 1;
      p->bAppRw = (flags & SQLITE_OPEN_READWRITE) && !(pOutFlags && (*pOutFlags & SQLITE_OPEN_READONLY)) &&
                  !sqlite3_uri_boolean(zName, "immutable", 0);
      p->bAppNoLock = sqlite3_uri_boolean(zName, "nolock", 0);
      pthread_mutex_lock(&gMutex);
      p->pDb->nApp++;
      p->pDb->nAppRw += p->bAppRw;
      p->pDb->nAppNoLock += p->bAppNoLock;
      pthread_mutex_unlock(&gMutex);
    }
  } else if (flags & SQLITE_OPEN_WAL) {
    struct stat st;
    p->eType = WSF_WAL;
    p->pDb = dbByWal(zName);
    if (p->pDb && !tEngineOpen && stat(zName, &st) == 0) {
      pthread_mutex_lock(&gMutex);
      p->bAppWal = 1;
      if (p->pDb->nAppWal++ == 0) {
        p->pDb->walDev = st.st_dev;
        p->pDb->walIno = st.st_ino;
      }
      pthread_mutex_unlock(&gMutex);
    }
  }
  if (tEngineOpen && p->eType != WSF_OTHER) {
    p->bEng = 1;
    pthread_mutex_lock(&gMutex);
    p->pNextEng = gEngFiles;
    if (gEngFiles) gEngFiles->pPrevEng = p;
    gEngFiles = p;
    pthread_mutex_unlock(&gMutex);
  }
  return SQLITE_OK;
}

/* Whether the WAL the application writes for database id is no longer the file
** at <db>-wal: another copy of SQLite in this process (stdlib sqlite3 beside
** apsw) closed its last connection to the database and, its POSIX locks not
** keeping it from ours, checkpointed and deleted the WAL under our connections.
** Their commits then go to a file no other connection, and no sync point, sees. */
int ws_wal_orphaned(int64_t id) {
  WsDb *pDb = dbById(id);
  struct stat st;
  char *zWal;
  int n, bOrphaned = 0;
  dev_t dev;
  ino_t ino;
  if (!pDb) return 0;
  pthread_mutex_lock(&gMutex);
  n = pDb->nAppWal;
  dev = pDb->walDev;
  ino = pDb->walIno;
  pthread_mutex_unlock(&gMutex);
  if (n == 0 || !(zWal = sqlite3_mprintf("%s-wal", pDb->zPath))) return 0;
  if (stat(zWal, &st) != 0) {
    bOrphaned = errno == ENOENT;
  } else {
    bOrphaned = st.st_dev != dev || st.st_ino != ino;
  }
  sqlite3_free(zWal);
  return bOrphaned;
}

/* The database whose WAL is at zWal, if this process has it open. */
static WsDb *dbByWal(const char *zWal) {
  size_t n = strlen(zWal);
  WsDb *pDb = 0;
  int64_t i;
  if (n < 4 || strcmp(zWal + n - 4, "-wal") != 0) return 0;
  pthread_mutex_lock(&gMutex);
  for (i = 0; i < gnDb && !pDb; i++) {
    if (strncmp(gaDb[i]->zPath, zWal, n - 4) == 0 && gaDb[i]->zPath[n - 4] == 0) pDb = gaDb[i];
  }
  pthread_mutex_unlock(&gMutex);
  return pDb;
}

static int wsDelete(sqlite3_vfs *v, const char *z, int syncDir) {
  WsDb *pDb = dbByWal(z);
  if (pDb) releaseWal(pDb);
  return ORIGVFS(v)->xDelete(ORIGVFS(v), z, syncDir);
}
static int wsAccess(sqlite3_vfs *v, const char *z, int flags, int *pOut) {
  return ORIGVFS(v)->xAccess(ORIGVFS(v), z, flags, pOut);
}
static int wsFullPathname(sqlite3_vfs *v, const char *z, int n, char *zOut) {
  return ORIGVFS(v)->xFullPathname(ORIGVFS(v), z, n, zOut);
}
static void *wsDlOpen(sqlite3_vfs *v, const char *z) { return ORIGVFS(v)->xDlOpen(ORIGVFS(v), z); }
static void wsDlError(sqlite3_vfs *v, int n, char *z) { ORIGVFS(v)->xDlError(ORIGVFS(v), n, z); }
static void (*wsDlSym(sqlite3_vfs *v, void *h, const char *z))(void) {
  return ORIGVFS(v)->xDlSym(ORIGVFS(v), h, z);
}
static void wsDlClose(sqlite3_vfs *v, void *h) { ORIGVFS(v)->xDlClose(ORIGVFS(v), h); }
static int wsRandomness(sqlite3_vfs *v, int n, char *z) { return ORIGVFS(v)->xRandomness(ORIGVFS(v), n, z); }
static int wsSleep(sqlite3_vfs *v, int us) { return ORIGVFS(v)->xSleep(ORIGVFS(v), us); }
static int wsCurrentTime(sqlite3_vfs *v, double *p) { return ORIGVFS(v)->xCurrentTime(ORIGVFS(v), p); }
static int wsGetLastError(sqlite3_vfs *v, int n, char *z) {
  return ORIGVFS(v)->xGetLastError(ORIGVFS(v), n, z);
}
static int wsCurrentTimeInt64(sqlite3_vfs *v, sqlite3_int64 *p) {
  return ORIGVFS(v)->xCurrentTimeInt64(ORIGVFS(v), p);
}
static int wsSetSystemCall(sqlite3_vfs *v, const char *z, sqlite3_syscall_ptr f) {
  return ORIGVFS(v)->xSetSystemCall(ORIGVFS(v), z, f);
}
static sqlite3_syscall_ptr wsGetSystemCall(sqlite3_vfs *v, const char *z) {
  return ORIGVFS(v)->xGetSystemCall(ORIGVFS(v), z);
}
static const char *wsNextSystemCall(sqlite3_vfs *v, const char *z) {
  return ORIGVFS(v)->xNextSystemCall(ORIGVFS(v), z);
}

static sqlite3_vfs ws_vfs = {
    3, 0, 1024, 0, WS_VFS_NAME, 0,
    wsOpen, wsDelete, wsAccess, wsFullPathname, wsDlOpen, wsDlError, wsDlSym, wsDlClose,
    wsRandomness, wsSleep, wsCurrentTime, wsGetLastError, wsCurrentTimeInt64,
    wsSetSystemCall, wsGetSystemCall, wsNextSystemCall,
};

/* ------------------------------------------------------- Python-side API */

/* Block until a record is queued, ws_wake() is called, or timeout_ms passes
** (negative: no limit). */
static void waitForRecords(int timeout_ms) {
  pthread_mutex_lock(&gMutex);
  if (!gHead && !gWake && timeout_ms != 0) {
    struct timespec ts = deadlineIn(timeout_ms < 0 ? (int64_t)1 << 60 : (int64_t)timeout_ms * 1000000);
    gWaiting++;
    while (!gHead && !gWake) {
      if (pthread_cond_timedwait(&gCond, &gMutex, &ts) == ETIMEDOUT) break;
    }
    gWaiting--;
  }
  gWake = 0;
  pthread_mutex_unlock(&gMutex);
}

void ws_wake(void) {
  pthread_mutex_lock(&gMutex);
  gWake = 1;
  pthread_cond_broadcast(&gCond);
  pthread_mutex_unlock(&gMutex);
}

/* Whether an application connection has database id open: any (WS_APP_ANY), one it can
** write through (WS_APP_RW), or one opened with nolock=1 (WS_APP_NOLOCK). */
#define WS_APP_ANY 0
#define WS_APP_RW 1
#define WS_APP_NOLOCK 2
static int appHas(int64_t id, int kind) {
  int n = 0;
  WsDb *p;
  pthread_mutex_lock(&gMutex);
  if (id >= 1 && id <= gnDb) {
    p = gaDb[id - 1];
    n = (kind == WS_APP_RW ? p->nAppRw : kind == WS_APP_NOLOCK ? p->nAppNoLock : p->nApp) > 0;
  }
  pthread_mutex_unlock(&gMutex);
  return n;
}

int ws_app_open(int64_t id) { return appHas(id, WS_APP_ANY); }

/* SQLite refuses WAL to a connection opened with nolock=1: switching such a database to WAL
** under it would make its next statement fail. */
int ws_app_nolock(int64_t id) { return appHas(id, WS_APP_NOLOCK); }

/* How long, in ns, application connections have held database id locked in a
** way that keeps the engine out (0: none does): as only locking_mode=EXCLUSIVE
** keeps it, or (bAnyLock) with any lock while none has its WAL open, so that a
** switch to WAL cannot get in. */
static int64_t appHeldNs(int64_t id, int bAnyLock) {
  int64_t ns = 0;
  int kind = -1;
  WsDb *p;
  pthread_mutex_lock(&gMutex);
  if (id >= 1 && id <= gnDb) {
    p = gaDb[id - 1];
    if (bAnyLock) {
      if (p->nExcl[WS_EXCL_HELD] > 0 && p->nAppWal == 0) kind = WS_EXCL_HELD;
    } else if (p->nExcl[WS_EXCL_KEPT] > 0) {
      kind = WS_EXCL_KEPT;
    } else if (p->nExcl[WS_EXCL_ANY] > 0 && p->nAppWal > 0) {
      kind = WS_EXCL_ANY;
    }
    if (kind >= 0) ns = monotonicNs() - p->exclSinceNs[kind];
  }
  pthread_mutex_unlock(&gMutex);
  return ns;
}

int64_t ws_app_exclusive_ns(int64_t id) { return appHeldNs(id, 0); }
int64_t ws_app_locked_ns(int64_t id) { return appHeldNs(id, 1); }

/* A process that only reads a database never leads its replication (leader.py). */
int ws_app_writable(int64_t id) { return appHas(id, WS_APP_RW); }

/* How many databases this process has open through the VFS: with none, the
** consumer may end (the next first open starts one again, see ws_on_open). */
int ws_open_count(void) {
  int64_t i;
  int n = 0;
  pthread_mutex_lock(&gMutex);
  for (i = 0; i < gnDb; i++) n += gaDb[i]->nRef > 0;
  pthread_mutex_unlock(&gMutex);
  return n;
}

/* Free what a record holds, leaving the record itself. */
static void clearRecord(ws_rec *r) {
  if (r->spool_fd >= 0) close(r->spool_fd); /* unless Python took it */
  releaseFrames(r);
  free(r->pIndex);
}

static void freeRecord(ws_rec *r) {
  clearRecord(r);
  free(r);
}

/* Read the frames of the detached commits the read-ahead left unread, a run at
** a time, before anything else: a writer about to restart its WAL waits for
** exactly these (waitConsumed), not for the checks that follow. */
static void readDetached(ws_rec *r) {
  uint32_t n;
  for (; r; r = r->next) {
    if (unreadCommit(r, r->pDb)) {
      WsDb *pDb = r->pDb;
      r = readRun(r, 0, consumerWal(pDb, 1), &n);
      commitsRead(pDb, n);
    }
  }
}

/* Detach every queued record, prepare its commits (checksum chain, page
** index) and group the records per database, each group in publish order. */
static ws_batch *takeBatches(void) {
  ws_rec *r, *next;
  ws_batch *head = 0, **pTail = &head;
  pthread_mutex_lock(&gMutex);
  r = gHead;
  gHead = gTail = gSeen = 0;
  pthread_mutex_unlock(&gMutex);
  readDetached(r);
  for (; r; r = next) {
    ws_batch *b = r->pDb->pBatch; /* only this thread touches pBatch */
    next = r->next;
    if (r->kind == WS_COMMIT) prepareCommit(r);
    r->next = 0;
    if (!b) {
      b = &r->pDb->batch;
      memset(b, 0, sizeof(*b));
      b->db_id = r->db_id;
      b->first = r;
      r->pDb->pBatch = b;
      *pTail = b;
      pTail = &b->next;
    } else {
      b->last->next = r;
    }
    b->last = r;
    b->nrec++;
    if (r->kind == WS_COMMIT) {
      b->ncommit++;
      if (r->db_size > b->max_db_size) b->max_db_size = r->db_size;
    }
    if (r->kind == WS_GAP) b->ngap++;
    if (r->kind == WS_OPEN && !b->open_path) b->open_path = r->path;
  }
  for (ws_batch *b = head; b; b = b->next) b->first->pDb->pBatch = 0;
  return head;
}

/* Free a drain's records; commit records go back to gSpare for reuse. */
static void freeBatches(ws_batch *b) {
  ws_rec *spare = 0, *last = 0;
  int n = 0;
  while (b) {
    ws_batch *nb = b->next;
    ws_rec *r = b->first;
    while (r) {
      ws_rec *next = r->next;
      if (r->kind == WS_COMMIT && n < WS_SPARE_MAX) {
        clearRecord(r);
        r->next = spare;
        if (!spare) last = r;
        spare = r;
        n++;
      } else {
        freeRecord(r);
      }
      r = next;
    }
    b = nb; /* the batch itself lives in its WsDb */
  }
  if (!spare) return;
  pthread_mutex_lock(&gMutex);
  if (gnSpare + n <= WS_SPARE_MAX) {
    last->next = gSpare;
    gSpare = spare;
    gnSpare += n;
    spare = 0;
  }
  pthread_mutex_unlock(&gMutex);
  while (spare) {
    ws_rec *next = spare->next;
    free(spare);
    spare = next;
  }
}

/* While the consumer lingers: read the frames of the queued commits nobody has
** read yet, a run at a time, so that the writer finds them read when it
** restarts the WAL (waitConsumed) instead of reading them itself.  gMutex is
** held on entry and exit, and dropped while reading: the writer's commits go
** on meanwhile, and a writer about to overwrite the WAL waits for the run in
** hand (it is pending until commitsRead). */
static void readAhead(void) {
  ws_rec *r = gSeen ? gSeen->next : gHead;
  sqlite3_int64 n;
  uint32_t nRec;
  gUnread = 0;
  for (; r; gSeen = r, r = r->next) {
    WsDb *pDb = r->pDb;
    if (!unreadCommit(r, pDb)) continue;
    nRec = claimRun(r, &n);
    pthread_mutex_unlock(&gMutex);
    r = readClaimed(r, nRec, n, 0, consumerWal(pDb, 1));
    commitsRead(pDb, nRec);
    pthread_mutex_lock(&gMutex);
  }
}

/* The consumer's whole cycle in one call, so the GIL is released once per
** drain rather than once per step: free the previous drain's batches, linger
** linger_us if it returned any (commits queue up meanwhile, so a busy writer
** costs one wake-up per linger, not one per commit), wait up to timeout_ms
** (negative: no limit) for a record, then take everything queued.  A batch
** stays valid until the next call.  Exactly one thread may call this. */
ws_batch *ws_drain(int timeout_ms, int linger_us) {
  static ws_batch *pPrev = 0;
  int bLinger = pPrev != 0 && linger_us > 0;
  freeBatches(pPrev);
  pPrev = 0;
  if (bLinger) { /* a writer waiting in waitConsumed() cuts it short */
    int64_t left = (int64_t)linger_us * 1000, tick = WS_READ_AHEAD_TICK_NS, waited;
    sqlite3_int64 n0;
    pthread_mutex_lock(&gMutex);
    while (!gWake && left > 0) {
      struct timespec ts;
      if (gUnread >= WS_READ_AHEAD) readAhead();
      if (tick > left) tick = left;
      ts = deadlineIn(tick);
      waited = monotonicNs();
      n0 = gUnread;
      pthread_cond_timedwait(&gCond, &gMutex, &ts);
      waited = monotonicNs() - waited;
      left -= waited;
      /* next: when the read-ahead is due if bytes keep coming at this rate */
      tick = gUnread > n0 ? (int64_t)((double)(WS_READ_AHEAD - gUnread) * (double)waited / (double)(gUnread - n0))
                          : left;
      if (tick < WS_READ_AHEAD_TICK_NS) tick = WS_READ_AHEAD_TICK_NS;
    }
    pthread_mutex_unlock(&gMutex);
  }
  if (timeout_ms != 0) waitForRecords(timeout_ms);
  pPrev = takeBatches();
  return pPrev;
}

static WsDb *dbById(int64_t id) {
  WsDb *p = 0;
  pthread_mutex_lock(&gMutex);
  if (id >= 1 && id <= gnDb) p = gaDb[id - 1];
  pthread_mutex_unlock(&gMutex);
  return p;
}

/*
** Establish the chain position from the WAL file on disk and report the seq
** of the last record so far: every commit with a higher seq happened after
** this point.  The caller must hold the WAL write lock (BEGIN IMMEDIATE on a
** connection to the same db) so no commit is in flight.  Returns 0 if the db
** id is unknown.
*/
int ws_sync(int64_t db_id, ws_pos *pOut) {
  WsDb *pDb = dbById(db_id);
  WsChain c;
  char *zWal;
  int fd;
  unsigned char hdr[WAL_HDR];
  uint32_t s1, s2, mx = UINT32_MAX, ic = 0;
  if (!pDb) return 0;
  memset(&c, 0, sizeof(c));
  zWal = sqlite3_mprintf("%s-wal", pDb->zPath);
  if (!zWal) return 0;
  fd = open(zWal, O_RDONLY | O_CLOEXEC);
  sqlite3_free(zWal);
  if (fd >= 0) {
    if (pread(fd, hdr, WAL_HDR, 0) == WAL_HDR && parseWalHeader(&c, hdr)) {
      uint32_t szFrame = FRAME_HDR + c.szPage, ck[2], n = 0;
      unsigned char *aFrame = malloc(szFrame);
      off_t off;
      /* Under the write lock the wal-index says exactly which frames SQLite
      ** committed: valid frames past them are a commit whose writer died
      ** before publishing it, which the next commit overwrites. */
      if (!shmHeader(pDb, &s1, &s2, &mx, &ic) || s1 != c.salt1 || s2 != c.salt2) mx = UINT32_MAX;
      ck[0] = c.cksum[0];
      ck[1] = c.cksum[1];
      for (off = WAL_HDR; aFrame && n < mx; off += szFrame, n++) {
        if (pread(fd, aFrame, szFrame, off) != (ssize_t)szFrame || !frameValid(&c, aFrame, ck)) break;
        if (get32(aFrame + 4)) {
          c.nFrame = n + 1;
          c.cksum[0] = ck[0];
          c.cksum[1] = ck[1];
        }
      }
      free(aFrame);
    }
    close(fd);
  }
  if (!c.bHdr) {
    /* No WAL yet: its first header will carry the wal-index's salts. */
    if (!shmHeader(pDb, &c.salt1, &c.salt2, &mx, &ic)) c.salt1 = c.salt2 = 0;
  }
  /* The counter belongs to the chain's end if the wal-index's last commit is it. */
  c.bChange = mx == c.nFrame;
  c.iChange = c.bChange ? ic : 0;
  c.bKnown = 1;
  __atomic_store_n(&pDb->bReopen, 1, __ATOMIC_RELEASE); /* the WAL may be a new file */
  pthread_mutex_lock(&pDb->mu);
  pthread_mutex_lock(&gMutex);
  pDb->c = c;
  pOut->seq = pDb->seq;
  pDb->aQueued[0] = c.salt1;
  pDb->aQueued[1] = c.salt2;
  pDb->aQueued[2] = c.nFrame;
  pthread_mutex_unlock(&gMutex);
  pthread_mutex_unlock(&pDb->mu);
  /* The sync point pins these frames for the engine: they count as read. */
  if (pDb->eRole == WS_ROLE_LEAD && pDb->pShared) setRead(pDb, c.salt1, c.salt2, c.nFrame);
  pOut->page_size = c.bHdr ? c.szPage : 0;
  pOut->nframe = c.nFrame;
  pOut->salt1 = c.salt1;
  pOut->salt2 = c.salt2;
  return 1;
}

/*
** Leader: publish the commits other processes added to the WAL since the
** last one published (see catchUp()).  Needs no lock: frames up to the
** wal-index's last commit stay put until this process has read them.
** Returns 1 if it published commits, 0 if there were none, -1 if the stream
** broke (a GAP was queued) or the chain position is not known yet.
*/
int ws_tail(int64_t db_id) {
  WsDb *pDb = dbById(db_id);
  uint32_t s1, s2, mx, ic;
  uint64_t seq;
  int rc = -1;
  if (!pDb) return -1;
  pthread_mutex_lock(&pDb->mu);
  seq = __atomic_load_n(&pDb->seq, __ATOMIC_ACQUIRE);
  if (pDb->c.bKnown && shmHeader(pDb, &s1, &s2, &mx, &ic) && catchUp(pDb, s1, s2, mx, &ic) == 0) {
    rc = __atomic_load_n(&pDb->seq, __ATOMIC_ACQUIRE) != seq;
  }
  pthread_mutex_unlock(&pDb->mu);
  if (__atomic_load_n(&pDb->nPending, __ATOMIC_ACQUIRE) > 0) {
    /* Read them now rather than when the consumer gets to them: another
    ** process may be waiting to restart the WAL (restartAllowed()). */
    char *zWal = sqlite3_mprintf("%s-wal", pDb->zPath);
    int fd = zWal ? open(zWal, O_RDONLY | O_CLOEXEC) : -1;
    sqlite3_free(zWal);
    if (fd >= 0) {
      pthread_mutex_lock(&gMutex);
      readQueued(pDb, 0, fd);
      pthread_mutex_unlock(&gMutex);
      close(fd);
    }
  }
  return rc;
}

/*
** Set this process's role for a db (WS_ROLE_*).  The leader records its pid,
** its id for the db and its socket's abstract name in the shared page;
** leaving the lead clears them if they are still ours.
*/
int ws_role(int64_t db_id, int role, const char *zAddr) {
  WsDb *pDb = dbById(db_id);
  WsShared *s;
  if (!pDb) return 0;
  s = pDb->pShared;
  if (role == WS_ROLE_FOLLOW) {
    pthread_mutex_lock(&pDb->mu);
    pDb->c.bKnown = 0; /* a leader again resyncs first */
    pthread_mutex_unlock(&pDb->mu);
  }
  pDb->eRole = role;
  if (!s) return role != WS_ROLE_FOLLOW; /* no shared page: this process is alone */
  if (role == WS_ROLE_LEAD || __atomic_load_n(&s->leaderPid, __ATOMIC_ACQUIRE) == (int32_t)getpid()) {
    uint32_t q = __atomic_load_n(&s->leadSeq, __ATOMIC_RELAXED) | 1;
    __atomic_store_n(&s->leadSeq, q, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if (role == WS_ROLE_LEAD) {
      memset(s->addr, 0, WS_ADDR_MAX);
      if (zAddr) strncpy(s->addr, zAddr, WS_ADDR_MAX - 1);
      __atomic_store_n(&s->leaderDbId, db_id, __ATOMIC_RELAXED);
      __atomic_store_n(&s->leaderPid, (int32_t)getpid(), __ATOMIC_RELAXED);
      if (!pDb->c.bKnown) readAnything(pDb);
    } else {
      __atomic_store_n(&s->leaderPid, 0, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&s->beat, monotonicNs(), __ATOMIC_RELEASE);
    __atomic_store_n(&s->leadSeq, q + 1, __ATOMIC_RELEASE);
  }
  return 1;
}

/* Leader: a sync is under way.  Without a place in the chain no frame needs
** protecting until its sync point (see readAnything()).  With one, commits
** queued and not yet read still do: a restart would erase their frames and
** every later commit would have to wait for a new snapshot. */
void ws_read_any(int64_t db_id) {
  WsDb *pDb = dbById(db_id);
  if (!pDb) return;
  pthread_mutex_lock(&pDb->mu);
  if (!pDb->c.bKnown) readAnything(pDb);
  pthread_mutex_unlock(&pDb->mu);
}

/* Leader: still here (called every fraction of WS_TAKEOVER_NS). */
void ws_beat(int64_t db_id) {
  WsDb *pDb = dbById(db_id);
  if (pDb && pDb->pShared && pDb->eRole == WS_ROLE_LEAD) {
    __atomic_store_n(&pDb->pShared->beat, monotonicNs(), __ATOMIC_RELEASE);
  }
}

/* The live leader of a db: its pid (0 if none), its id for the db and its
** socket's abstract name (zAddr: WS_ADDR_MAX bytes). */
int ws_leader(int64_t db_id, int64_t *pLeaderDbId, char *zAddr) {
  WsDb *pDb = dbById(db_id);
  return pDb ? leaderOf(pDb->pShared, pLeaderDbId, zAddr) : 0;
}

/* Refuse (delta > 0) or allow again (delta < 0) WAL restarts for a db. */
void ws_hold(int64_t db_id, int delta) {
  WsDb *pDb = dbById(db_id);
  if (pDb) __atomic_add_fetch(&pDb->nHold, delta, __ATOMIC_ACQ_REL);
}

/*
** Read through an open sqlite3_file (from SQLITE_FCNTL_FILE_POINTER).  Python
** must never open() a database file itself: closing any descriptor of a file
** drops every POSIX lock this process holds on it, after which another
** process may checkpoint and delete the WAL under our connections.
*/
int ws_read(void *pFile, void *buf, int n, int64_t off) {
  sqlite3_file *f = pFile;
  return f->pMethods->xRead(f, buf, n, off);
}

int64_t ws_file_size(void *pFile) {
  sqlite3_file *f = pFile;
  sqlite3_int64 sz = -1;
  return f->pMethods->xFileSize(f, &sz) == SQLITE_OK ? sz : -1;
}

/* Give free heap memory back to the OS where the C library can (glibc); 0 if
** nothing was released or there is no such call.  Here rather than through a
** runtime cffi declaration, whose parser alone takes megabytes of memory. */
int ws_release_heap(void) {
#ifdef __GLIBC__
  return malloc_trim(0);
#else
  return 0;
#endif
}

/* ------------------------------------------------------------- fork() */

/* ------------------------------------------------- internal connections
**
** The engine's own connections (sync points) are opened here, on SQLite's C
** API, rather than as apsw.Connection objects: apsw lists every Connection
** in apsw.connections() and runs apsw.connection_hooks on it, and an
** application that walks that list must not find (and close, from another
** thread) connections that are not its own.
*/

/* The busy handler of the engine's connections: short sleeps, as the
** application's writers let them in as soon as the lock is free (engineFirst());
** longer ones after a while (another process holds it); gives up after about
** the busy timeout, in ms, that pArg carries. */
static int engineBusy(void *pArg, int nTry) {
  int busyMs = (int)(intptr_t)pArg;
  int slept = nTry < 100 ? nTry : 100 + (nTry - 100) * 10;
  if (slept >= busyMs) return 0;
  sqlite3_sleep(nTry < 100 ? 1 : 10);
  return 1;
}

/* Open zPath read-write through this VFS; NULL with the reason in zErr. */
void *ws_conn_open(const char *zPath, int busyMs, char *zErr, int nErr) {
  sqlite3 *db = 0;
  int rc;
  tEngineOpen = 1;
  rc = sqlite3_open_v2(zPath, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX, WS_VFS_NAME);
  tEngineOpen = 0;
  if (rc != SQLITE_OK) {
    sqlite3_snprintf(nErr, zErr, "%s", db ? sqlite3_errmsg(db) : "out of memory");
    sqlite3_close_v2(db);
    return 0;
  }
  sqlite3_busy_handler(db, engineBusy, (void *)(intptr_t)busyMs);
  /* Closing the last connection checkpoints and deletes the WAL; while the
  ** application has the db open ours must never be that one: the WAL may hold
  ** commits a sync is about to take (see ws_conn_close()). */
  sqlite3_db_config(db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, (int *)0);
  return db;
}

/* Run one statement to completion; zOut gets the first column of its first
** row (or the error message).  Returns SQLite's result code. */
int ws_conn_query(void *pDb, const char *zSql, char *zOut, int nOut) {
  sqlite3 *db = pDb;
  sqlite3_stmt *st = 0;
  int rc = sqlite3_prepare_v2(db, zSql, -1, &st, 0), bFirst = 1;
  zOut[0] = 0;
  while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    if (bFirst && sqlite3_column_count(st) > 0) {
      const unsigned char *z = sqlite3_column_text(st, 0);
      sqlite3_snprintf(nOut, zOut, "%s", z ? (const char *)z : "");
    }
    bFirst = 0;
    rc = SQLITE_OK;
  }
  if (rc == SQLITE_DONE) rc = SQLITE_OK;
  if (rc != SQLITE_OK) sqlite3_snprintf(nOut, zOut, "%s", sqlite3_errmsg(db));
  sqlite3_finalize(st);
  return rc;
}

int ws_conn_fcntl(void *pDb, int op, void *pArg) { return sqlite3_file_control(pDb, "main", op, pArg); }

int ws_conn_in_txn(void *pDb) { return !sqlite3_get_autocommit(pDb); }

/* Once the application has closed the db, ours may be the last connection,
** kept open by a sync past the application's own close, which then left the
** WAL in place: close it as the application's would have, checkpointing and
** deleting the WAL and its index, as SQLite does without this VFS.  What the
** sync needed from the WAL it has taken by now. */
void ws_conn_close(void *pDb) {
  int64_t id = 0;
  WsDb *p;
  sqlite3_file_control(pDb, "main", WS_FCNTL_DB_ID, &id);
  if ((p = dbById(id)) != 0) {
    int nApp;
    pthread_mutex_lock(&gMutex);
    nApp = p->nApp;
    pthread_mutex_unlock(&gMutex);
    if (nApp == 0) sqlite3_db_config(pDb, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 0, (int *)0);
  }
  sqlite3_close_v2(pDb);
}

/* SQLite's static mutexes (allocator, page cache, VFS, PRNG ...) are held for
** the fork, as gMutex is: a child forked while another thread was inside
** sqlite3_malloc() would otherwise wait forever at its first allocation, and
** the engine's threads use SQLite while a pre-fork server forks its workers.
** Each is only tried, all released and tried again if one is busy, so no lock
** order is assumed; past a second the fork goes ahead as it did before. */
static const int aForkMutex[] = {
  SQLITE_MUTEX_STATIC_MAIN, SQLITE_MUTEX_STATIC_APP1, SQLITE_MUTEX_STATIC_APP2,
  SQLITE_MUTEX_STATIC_APP3, SQLITE_MUTEX_STATIC_OPEN, SQLITE_MUTEX_STATIC_PRNG,
  SQLITE_MUTEX_STATIC_VFS1, SQLITE_MUTEX_STATIC_VFS2, SQLITE_MUTEX_STATIC_VFS3,
  SQLITE_MUTEX_STATIC_LRU, SQLITE_MUTEX_STATIC_PMEM, SQLITE_MUTEX_STATIC_MEM,
};
#define WS_FORK_MUTEXES ((int)(sizeof(aForkMutex) / sizeof(aForkMutex[0])))
static sqlite3_mutex *gForkHeld[WS_FORK_MUTEXES];
static int gnForkHeld = 0;

static void forkLeaveSqlite(void) {
  while (gnForkHeld > 0) sqlite3_mutex_leave(gForkHeld[--gnForkHeld]);
}

static void forkEnterSqlite(void) {
  struct timespec pause = {0, 50000};
  int tries;
  for (tries = 0; tries < 20000; tries++) {
    int i;
    for (i = 0; i < WS_FORK_MUTEXES; i++) {
      sqlite3_mutex *m = sqlite3_mutex_alloc(aForkMutex[i]);
      if (!m) continue;
      if (sqlite3_mutex_try(m) != SQLITE_OK) break;
      gForkHeld[gnForkHeld++] = m;
    }
    if (i == WS_FORK_MUTEXES) return;
    forkLeaveSqlite();
    nanosleep(&pause, 0);
  }
}

/* gMutex first: code under it may allocate through SQLite (a spool file's
** name), while nothing holding a SQLite mutex takes gMutex. */
static void forkPrepare(void) {
  pthread_mutex_lock(&gMutex);
  pthread_mutex_lock(&gSpoolMutex); /* taken under gMutex (readQueued, spoolOpen) */
  forkEnterSqlite();
}
static void forkParent(void) {
  forkLeaveSqlite();
  pthread_mutex_unlock(&gSpoolMutex);
  pthread_mutex_unlock(&gMutex);
}
/*
** SQLite's unix VFS counts a process's locks per file in memory, and a child
** inherits those counts with the parent's open connections: its own
** connections then take no lock the counts say the process holds already.  The
** engine's connections (a sync in progress at the fork) would so leave the
** child's connections without locks, and the parent's last close would
** checkpoint and delete the WAL under them.  The child lets go of the files of
** the engine's connections and of the pin: locks released, wal-index unmapped,
** closed.  Their connections are never used in the child.  (An application's
** own connection carried across fork() is SQLite's rule to keep.)
*/
static void forkLetGo(void) {
  WsFile *p;
  int64_t i;
  for (p = gEngFiles; p; p = p->pNextEng) {
    sqlite3_file *r = p->pReal;
    int k;
    for (k = 0; k < 32; k++) {
      if (p->shmExcl & (1u << k)) r->pMethods->xShmLock(r, k, 1, SQLITE_SHM_UNLOCK | SQLITE_SHM_EXCLUSIVE);
      if (p->shmShared & (1u << k)) r->pMethods->xShmLock(r, k, 1, SQLITE_SHM_UNLOCK | SQLITE_SHM_SHARED);
    }
    if (p->eType == WSF_MAIN && r->pMethods->iVersion >= 2) r->pMethods->xShmUnmap(r, 0);
    r->pMethods->xClose(r);
    p->base.pMethods = &ws_forked_methods;
  }
  gEngFiles = 0;
  for (i = 0; i < gnDb; i++) pinClose(gaDb[i]);
}

/* A child process starts with no connection of its own (SQLite forbids using
** the parent's across fork), no queue and no consumer: forget the parent's
** per-process state so its first open is an OPEN, and a role of its own. */
static void forkChild(void) {
  int64_t i;
  pthread_mutexattr_t ma;
  forkLeaveSqlite();
  forkLetGo();
  pthread_mutexattr_init(&ma);
  pthread_mutexattr_settype(&ma, WS_MUTEX_SPINS);
  pthread_mutex_init(&gMutex, &ma);
  pthread_mutexattr_destroy(&ma);
  pthread_mutex_init(&gSpoolMutex, 0);
  pthread_cond_init(&gCond, 0);
  pthread_cond_init(&gDone, 0);
  pthread_cond_init(&gEngWrite, 0);
  gEngWriting.n = 0; /* the engine's connections stayed in the parent */
  gHead = gTail = 0; /* the parent's records stay the parent's */
  gWaiting = gWake = 0;
  gUnread = 0;
  gSeen = 0;
  pthread_mutexattr_init(&ma);
  pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
  for (i = 0; i < gnDb; i++) {
    WsDb *p = gaDb[i];
    pthread_mutex_init(&p->mu, &ma);
    if (p->walFd >= 0) close(p->walFd);
    p->walFd = -1;
    p->nRef = p->nApp = p->nAppRw = p->nAppNoLock = p->nHold = p->nWaiter = p->nPending = 0;
    p->nEngWrite = 0; /* the engine's connections stayed in the parent */
    p->eRole = WS_ROLE_NONE;
    p->c.bKnown = 0;
    p->pShm = 0;
    p->nShm = 0;
    p->iPin = p->iLastPin = 0;
    p->pBatch = 0;
    memset(p->own, 0, sizeof(p->own));
  }
  pthread_mutexattr_destroy(&ma);
}

/* ---------------------------------------------------------- entry point */

#ifdef _WIN32
__declspec(dllexport)
#endif
int sqlite3_walsync_init(sqlite3 *db, char **pzErrMsg, const sqlite3_api_routines *pApi) {
  int rc = SQLITE_OK;
  sqlite3_vfs *pOrig;
  SQLITE_EXTENSION_INIT2(pApi);
  (void)db;
  (void)pzErrMsg;
  if (sqlite3_vfs_find(WS_VFS_NAME)) return SQLITE_OK_LOAD_PERMANENTLY;
  pOrig = sqlite3_vfs_find(0);
  if (!pOrig) return SQLITE_ERROR;
  ws_vfs.iVersion = pOrig->iVersion < 3 ? pOrig->iVersion : 3;
  ws_vfs.szOsFile = pOrig->szOsFile + (int)sizeof(WsFile);
  ws_vfs.mxPathname = pOrig->mxPathname;
  ws_vfs.pAppData = pOrig;
  rc = sqlite3_vfs_register(&ws_vfs, 0);
  if (rc == SQLITE_OK) pthread_atfork(forkPrepare, forkParent, forkChild);
  return rc == SQLITE_OK ? SQLITE_OK_LOAD_PERMANENTLY : rc;
}
