/*
** commits.c -- turns drained COMMIT records into the commits each database's
** lineage queues for upload, with the GIL released once per drain.
**
** For each record it takes, ws_extend() does what the Python lineage would do
** per commit and per page: gives the commit the lineage's next txid and a
** time that never goes back, updates the whole-database checksum (FORMAT.md
** §3: XOR of XXH3-64 page hashes seeded with the page number, kept per page
** in the caller's array), packs the segment index entry (§4.2) and the
** commit's record bytes (§4.3: page numbers, then pages) at the end of a run.
** A run is what one segment will hold: the caller keeps a database's newest
** run open, so the commits of many drains go into it, until the uploader
** takes it (or it reaches a segment's size: then another begins).  Python
** then touches a run per segment, not a commit or a page, and per drain only
** a few numbers per database.  ws_extend_all() does it for the chains of
** every database in one call.
**
** It stops at the first record it cannot take as it is (another kind, a page
** size other than the lineage's, pages in a spool file, a commit bigger than a
** segment, a page list the checksum rules refuse): the caller handles that one
** the general way, which also words any error.
*/

#define WS_ENTRY_SIZE 44 /* >QqIIQIII: txid time_ns db_size page_count checksum salt1 salt2 end */

/* A lineage's end, as ws_extend() reads and advances it. */
typedef struct ws_lineage {
  uint64_t *hashes;   /* hash of each page, db_size used of capacity (a batch's max_db_size) */
  uint32_t capacity;
  uint32_t db_size;
  uint64_t value;     /* whole-database checksum */
  uint64_t next_txid;
  int64_t time_ns;    /* of the last commit */
  uint64_t sync_seq;  /* records up to this seq are in the state the lineage started from */
  uint32_t page_size;
  uint64_t max_bytes; /* a segment's page bytes: a run holds no more (unless one commit) */
} ws_lineage;

/* Record bytes of a run: one allocation, this header, then `capacity` bytes of which
   `used` hold records, back to back.  A commit's record is never split between blocks. */
typedef struct ws_block ws_block;
struct ws_block {
  ws_block *next;
  uint64_t capacity;
  uint64_t used;
};

/* Consecutive commits of one lineage, packed for one segment.  ws_extend() adds
   to it while the caller keeps it open: index entries at the end of one array,
   records in the last block while it has room, else in a new one twice as big
   (or as big as the call's records), so no record is moved or copied once
   written; sealed, the caller owns the array and the blocks (NULL here) and only
   the numbers stay. */
typedef struct ws_run ws_run;
struct ws_run {
  ws_run *next;            /* the next run the same ws_extend() began */
  int32_t sealed;          /* set by the caller: nothing is added any more */
  uint32_t page_size;
  uint32_t ncommit;
  uint64_t pages;          /* of all its commits */
  uint64_t first_txid, last_txid;
  int64_t first_time_ns;
  uint64_t last_seq;       /* record seq of its last commit */
  uint32_t salt1, salt2, wal_end; /* where its last commit ended in the source's WAL */
  unsigned char *entries;  /* ncommit index entries of WS_ENTRY_SIZE, of entries_cap */
  uint64_t entries_cap;
  ws_block *blocks, *last_block; /* its records, oldest first */
  uint64_t first_block;    /* the capacity of its first block (0: the smallest) */
};

/* One database's part of a ws_extend_all() call. */
typedef struct ws_extension {
  ws_rec *first;           /* in: its first record */
  ws_run *open;            /* in: the run its commits go on, NULL: none open */
  ws_lineage lineage;      /* in: its lineage's end; out: advanced past the commits made */
  ws_rec *next;            /* out: the first record not taken (NULL: none left) */
  uint64_t last_seq;       /* out: of the last record taken (0: none) */
  uint32_t made;           /* out: commits made (records inside the sync state are taken, not made) */
  uint64_t pages;          /* out: of the commits made */
  ws_run *began;           /* out: runs begun after `open`, linked by next; the caller frees them */
} ws_extension;

static void ws_put32(unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)(v >> 24);
  p[1] = (unsigned char)(v >> 16);
  p[2] = (unsigned char)(v >> 8);
  p[3] = (unsigned char)v;
}

static void ws_put64(unsigned char *p, uint64_t v) {
  ws_put32(p, (uint32_t)(v >> 32));
  ws_put32(p + 4, (uint32_t)v);
}

/* The page holding SQLite's pending byte: never written, counted as zeros (§3). */
static uint32_t ws_lock_page(uint32_t page_size) {
  return (uint32_t)(((uint64_t)1 << 30) / page_size + 1);
}

/* Whether the lineage can take `r` as it stands when the database has `size` pages. */
static int ws_takes(const ws_rec *r, const ws_lineage *l, uint32_t size) {
  if (r->kind != WS_COMMIT || r->spool_fd >= 0 || !r->pages || r->page_size != l->page_size) {
    return 0;
  }
  if (r->seq <= l->sync_seq) return 1;
  if (r->db_size < 1 || r->db_size > l->capacity || r->frame_end == 0) return 0;
  if ((uint64_t)r->npages * r->page_size > l->max_bytes) return 0;
  uint32_t prev = 0, grown = 0, lock = ws_lock_page(r->page_size), lockGiven = 0;
  for (uint32_t i = 0; i < r->npages; i++) {
    uint32_t pgno = r->pgnos[i];
    if (pgno <= prev || pgno > r->db_size) return 0;
    if (pgno > size) grown++;
    if (pgno == lock) lockGiven = 1;
    prev = pgno;
  }
  if (r->db_size > size) {  /* every new page given, but the lock page */
    uint32_t need = r->db_size - size;
    if (size < lock && lock <= r->db_size && !lockGiven) need--;
    if (grown != need) return 0;
  }
  return 1;
}

static unsigned char wsZeroPage[65536]; /* the lock page's content, never written */

/* Apply commit `r` to the lineage; its entry and record bytes go to `entry` and `body`. */
static void ws_apply(const ws_rec *r, ws_lineage *l, unsigned char *entry, unsigned char *body) {
  uint64_t *h = l->hashes, value = l->value;
  uint32_t old = l->db_size, ps = r->page_size, lock = ws_lock_page(ps);
  if (r->db_size < old) {
    for (uint32_t i = r->db_size; i < old; i++) value ^= h[i];
  } else if (r->db_size > old) {
    memset(h + old, 0, (size_t)(r->db_size - old) * 8);
    if (old < lock && lock <= r->db_size) {
      uint64_t z = ws_xxh3_long(wsZeroPage, ps, lock);
      value ^= z;
      h[lock - 1] = z;
    }
  }
  unsigned char *pages = body + 4 * (size_t)r->npages;
  for (uint32_t i = 0; i < r->npages; i++) {
    uint32_t pgno = r->pgnos[i];
    uint64_t x = ws_xxh3_long(r->pages[i], ps, pgno);
    value ^= h[pgno - 1] ^ x;
    h[pgno - 1] = x;
    ws_put32(body + 4 * (size_t)i, pgno);
    memcpy(pages + (size_t)i * ps, r->pages[i], ps);
  }
  l->db_size = r->db_size;
  l->value = value;
  if (r->time_ns > l->time_ns) l->time_ns = r->time_ns;
  ws_put64(entry, l->next_txid++);
  ws_put64(entry + 8, (uint64_t)l->time_ns);
  ws_put32(entry + 16, r->db_size);
  ws_put32(entry + 20, r->npages);
  ws_put64(entry + 24, value);
  ws_put32(entry + 32, r->salt1);
  ws_put32(entry + 36, r->salt2);
  ws_put32(entry + 40, r->frame_end);
}

/* Blocks this big are mappings of their own, unmapped when freed: from the C library's heap,
   freed on an upload thread, they would stay in its arenas (glibc keeps freed chunks, and
   after the first freed mapping serves blocks up to 32 MiB from the heap).  Freed blocks of
   the sizes a run grows through are kept, up to a pool's bytes in all, for the next runs: a
   steady writer's runs then reuse memory instead of faulting in (and zeroing) every page
   of every run afresh.  A run's records are grouped so that its blocks have those sizes. */
#define WS_MAPPED_BLOCK (256 << 10)
#define WS_MAX_BLOCK (4 << 20)
#define WS_SIZES 5 /* 256 KiB, 512 KiB, ... WS_MAX_BLOCK */
#define WS_KEPT_PER_SIZE 64

typedef struct ws_pool ws_pool;
struct ws_pool {
  ws_block *kept[WS_SIZES][WS_KEPT_PER_SIZE];
  int nkept[WS_SIZES];
  uint64_t bytes, most; /* kept now, and at most */
  /* Taken without waiting: when busy a block is mapped or unmapped instead (and a child
     forked while it was taken never uses the kept blocks). */
  int busy;
};
/* Runs' blocks, and the WAL frames walsync.c reads before they are copied into runs: apart,
   as a drain makes all its reads (a read ahead every 256 KiB of commits) before its runs
   take any block. */
static ws_pool ws_runs_pool = {.most = 24 << 20};
static ws_pool ws_frames_pool = {.most = 32 << 20};

static int ws_kept_take(ws_pool *pool) {
  return !__atomic_exchange_n(&pool->busy, 1, __ATOMIC_ACQUIRE);
}
static void ws_kept_give(ws_pool *pool) { __atomic_store_n(&pool->busy, 0, __ATOMIC_RELEASE); }

/* The kept list for blocks of `cap` bytes (-1: blocks of that size are not kept). */
static int ws_size_class(uint64_t cap) {
  for (int i = 0; i < WS_SIZES; i++) {
    if (cap == ((uint64_t)WS_MAPPED_BLOCK << i)) return i;
  }
  return -1;
}

static ws_block *ws_block_new(ws_pool *pool, uint64_t cap) {
  ws_block *b = 0;
  int i;
  if (cap < WS_MAPPED_BLOCK) return malloc(sizeof(ws_block) + cap);
  i = ws_size_class(cap);
  if (i >= 0 && ws_kept_take(pool)) {
    if (pool->nkept[i] > 0) {
      b = pool->kept[i][--pool->nkept[i]];
      pool->bytes -= cap;
    }
    ws_kept_give(pool);
    if (b) return b;
  }
  void *p = mmap(0, sizeof(ws_block) + cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? 0 : p;
}

static void ws_block_free(ws_pool *pool, ws_block *b) {
  int i;
  if (b->capacity < WS_MAPPED_BLOCK) {
    free(b);
    return;
  }
  i = ws_size_class(b->capacity);
  if (i >= 0 && ws_kept_take(pool)) {
    int kept = pool->nkept[i] < WS_KEPT_PER_SIZE && pool->bytes + b->capacity <= pool->most;
    if (kept) {
      pool->kept[i][pool->nkept[i]++] = b;
      pool->bytes += b->capacity;
    }
    ws_kept_give(pool);
    if (kept) return;
  }
  munmap(b, sizeof(ws_block) + b->capacity);
}

/* `cap` doubled until it holds `len` bytes or reaches WS_MAX_BLOCK, the largest kept size;
   `len` itself past that. */
static uint64_t ws_grown(uint64_t cap, uint64_t len) {
  while (cap < len && cap < WS_MAX_BLOCK) cap *= 2;
  return cap < len ? len : cap;
}

/* Memory for `n` bytes of WAL frames (walsync.c): a block of the smallest kept size that
   holds them, so a steady stream's reads reuse memory too. */
void *ws_mem_new(uint64_t n) {
  uint64_t cap = n <= WS_MAPPED_BLOCK ? n : ws_grown(WS_MAPPED_BLOCK, n);
  ws_block *b = ws_block_new(&ws_frames_pool, cap);
  if (!b) return 0;
  b->capacity = cap;
  return b + 1;
}

void ws_mem_free(void *p) { ws_block_free(&ws_frames_pool, (ws_block *)p - 1); }

static void ws_pool_release(ws_pool *pool) {
  if (!ws_kept_take(pool)) return;
  for (int i = 0; i < WS_SIZES; i++) {
    while (pool->nkept[i] > 0) {
      ws_block *b = pool->kept[i][--pool->nkept[i]];
      munmap(b, sizeof(ws_block) + b->capacity);
    }
  }
  pool->bytes = 0;
  ws_kept_give(pool);
}

/* Unmap the kept blocks: the engine calls this once uploads have freed runs (at most once a
   second), so a stream that stopped gives them back and a steady one makes a few anew. */
void ws_blocks_release(void) {
  ws_pool_release(&ws_runs_pool);
  ws_pool_release(&ws_frames_pool);
}

/* A run's memory, its index entries and its chain of blocks: freed in one call, as a sealed
   run's is once the uploader is done with all of it (one GIL hand-off, not one per block). */
void ws_run_memory_free(unsigned char *entries, ws_block *blocks) {
  for (ws_block *b = blocks, *next; b; b = next) {
    next = b->next;
    ws_block_free(&ws_runs_pool, b);
  }
  free(entries);
}

void ws_run_free(ws_run *run) {
  if (!run) return;
  ws_run_memory_free(run->entries, run->blocks);
  free(run);
}

/* Bytes of commit r's record: page numbers, then pages (FORMAT.md §4.3). */
static uint64_t ws_record_bytes(const ws_rec *r) { return (uint64_t)r->npages * (4 + r->page_size); }

/* The size of the block a run that needs `len` more bytes begins: twice its last block (the
   first 16 KiB), up to WS_MAX_BLOCK, and a kept size for any `len` up to WS_MAX_BLOCK.  Only a
   commit bigger than that has a block of its own size. */
static uint64_t ws_next_capacity(const ws_run *run, uint64_t len) {
  uint64_t cap = run->last_block ? 2 * run->last_block->capacity
                                 : run->first_block ? run->first_block : 16384;
  return ws_grown(cap > WS_MAX_BLOCK ? WS_MAX_BLOCK : cap, len);
}

/* Bytes of records `run` can take into one block: what its last block has left, or else what
   the next block will hold, if `first` (the first record's size) fits there. */
static uint64_t ws_block_room(const ws_run *run, uint64_t first) {
  const ws_block *b = run->last_block;
  if (b && b->capacity - b->used >= first) return b->capacity - b->used;
  return ws_next_capacity(run, first);
}

/* Room in `run` for `n` more index entries and `len` more record bytes: where the records
   go (NULL: memory ran out, nothing changed). */
static unsigned char *ws_room(ws_run *run, uint64_t n, uint64_t len) {
  uint64_t need = (run->ncommit + n) * (uint64_t)WS_ENTRY_SIZE;
  if (need > run->entries_cap) {
    uint64_t cap = run->entries_cap ? run->entries_cap : 64 * WS_ENTRY_SIZE;
    while (cap < need) cap *= 2;
    unsigned char *grown = realloc(run->entries, cap);
    if (!grown) return 0;
    run->entries = grown;
    run->entries_cap = cap;
  }
  ws_block *b = run->last_block;
  if (!b || b->capacity - b->used < len) {
    uint64_t cap = ws_next_capacity(run, len);
    b = ws_block_new(&ws_runs_pool, cap);
    if (!b) return 0;
    b->next = 0;
    b->capacity = cap;
    b->used = 0;
    if (run->last_block) {
      run->last_block->next = b;
    } else {
      run->blocks = b;
    }
    run->last_block = b;
  }
  unsigned char *at = (unsigned char *)(b + 1) + b->used;
  b->used += len;
  return at;
}

/* Whether `run` may take commit `r` (with `more` commits of `pages` pages before it, not
   added yet): open, of its page size, and within a segment's size unless it is the first. */
static int ws_fits(const ws_run *run, uint64_t more, uint64_t pages, const ws_rec *r,
                   const ws_lineage *l) {
  return !run->sealed && run->page_size == r->page_size &&
         (!(run->ncommit + more) ||
          (run->pages + pages + r->npages) * (uint64_t)run->page_size <= l->max_bytes);
}

/* Take the records from x->first on that the lineage can take as they are (see the top),
   adding their commits to x->open or to runs begun after it, and advancing the lineage.
   When memory runs out it stops there: the record not taken goes the general way. */
static void ws_extend(ws_extension *x) {
  ws_lineage *l = &x->lineage;
  ws_run *run = x->open, **began = &x->began;
  ws_rec *r = x->first;
  x->last_seq = x->pages = 0;
  x->made = 0;
  x->began = 0;
  /* Records inside the state the lineage started from: taken, nothing made. */
  for (; r && r->seq <= l->sync_seq && ws_takes(r, l, l->db_size); r = r->next) {
    x->last_seq = r->seq;
  }
  while (r && ws_takes(r, l, l->db_size)) {
    ws_run *to = run && ws_fits(run, 0, 0, r, l) ? run : calloc(1, sizeof(ws_run));
    if (!to) break;
    /* A run that follows a full one begins with blocks as big as that one's last: a busy
       stream's runs are then a few blocks each, and each block costs the uploader a GIL
       hand-off (compressed, then freed). */
    if (to != run && run && run->last_block) to->first_block = run->last_block->capacity;
    to->page_size = r->page_size;
    /* The commits from r on that `to` takes, sized first: their records go in one block. */
    uint64_t n = 0, pages = 0, len = 0;
    uint64_t room = ws_block_room(to, ws_record_bytes(r));
    uint32_t size = l->db_size;
    for (ws_rec *q = r; q && ws_takes(q, l, size) && ws_fits(to, n, pages, q, l) &&
                        (!n || len + ws_record_bytes(q) <= room);
         q = q->next) {
      n++;
      pages += q->npages;
      len += ws_record_bytes(q);
      size = q->db_size;
    }
    unsigned char *records = ws_room(to, n, len);
    if (!records) {
      if (to != run) ws_run_free(to);
      break;
    }
    if (to != run) {
      *began = to;
      began = &to->next;
      run = to;
    }
    for (uint64_t i = 0; i < n; i++, r = r->next) {
      ws_apply(r, l, run->entries + (size_t)run->ncommit * WS_ENTRY_SIZE, records);
      records += ws_record_bytes(r);
      if (!run->ncommit++) {
        run->first_txid = l->next_txid - 1;
        run->first_time_ns = l->time_ns;
      }
      run->last_txid = l->next_txid - 1;
      run->pages += r->npages;
      run->last_seq = r->seq;
      run->salt1 = r->salt1;
      run->salt2 = r->salt2;
      run->wal_end = r->frame_end;
      x->made++;
      x->pages += r->npages;
      x->last_seq = r->seq;
    }
  }
  x->next = r;
}

/* The numbers ws_extend_all() reads (`in`) and writes (`out`) per database, in this order:
   flat arrays, so the caller passes and reads them for every database at once. */
#define WS_IN_N 7  /* capacity, db_size, value, next_txid, sync_seq, page_size, max_bytes */
#define WS_OUT_N 6 /* last_seq, made, pages, db_size, value, next_txid */

/* ws_extend() for each of `n` databases: its records from first[i] on, the run open[i]
   (or NULL), its lineage's page hashes hashes[i], the other numbers of its lineage's end
   in in[] and times[i] (the time of its last commit, advanced in place); what it made in
   out[], next[i] and began[i] (see ws_extension). */
void ws_extend_all(uint32_t n, ws_rec **first, ws_run **open, uint64_t **hashes,
                   const uint64_t *in, int64_t *times, uint64_t *out, ws_rec **next,
                   ws_run **began) {
  for (uint32_t i = 0; i < n; i++) {
    const uint64_t *a = in + (size_t)i * WS_IN_N;
    ws_extension x = {first[i], open[i],
                      {hashes[i], (uint32_t)a[0], (uint32_t)a[1], a[2], a[3], times[i], a[4],
                       (uint32_t)a[5], a[6]}};
    ws_extend(&x);
    uint64_t *o = out + (size_t)i * WS_OUT_N;
    o[0] = x.last_seq;
    o[1] = x.made;
    o[2] = x.pages;
    o[3] = x.lineage.db_size;
    o[4] = x.lineage.value;
    o[5] = x.lineage.next_txid;
    times[i] = x.lineage.time_ns;
    next[i] = x.next;
    began[i] = x.began;
  }
}
