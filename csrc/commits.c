/*
** commits.c -- turns a database's drained COMMIT records into the commits its
** lineage queues for upload, many at a time, with the GIL released.
**
** For each record it takes, ws_extend() does what the Python lineage would do
** per commit and per page: gives the commit the lineage's next txid and a
** time that never goes back, updates the whole-database checksum (FORMAT.md
** §3: XOR of XXH3-64 page hashes seeded with the page number, kept per page
** in the caller's array), packs the segment index entry (§4.2) and the
** commit's record bytes (§4.3: page numbers, then pages).  Python then touches
** a run of commits, not their pages.
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
  uint64_t max_bytes; /* a commit with more page bytes goes in parts: not taken */
} ws_lineage;

/* What one ws_extend() took, and the lineage's end after it. */
typedef struct ws_run {
  ws_rec *next;          /* the first record not taken (NULL: none left) */
  uint64_t last_seq;     /* of the last record taken (0: none) */
  uint32_t ncommit;      /* commits made (records inside the sync state are taken, not made) */
  unsigned char *block;  /* malloc'd, the caller frees it: seqs, offsets, entries, bodies */
  uint64_t block_len;
  uint64_t entries_at;   /* where in block the ncommit index entries of WS_ENTRY_SIZE start */
  uint64_t *seqs;        /* each commit's record seq */
  uint64_t *offsets;     /* ncommit + 1 offsets into the bodies: commit i is [offsets[i], offsets[i+1]) */
  uint32_t db_size;      /* the lineage's end after the run */
  uint64_t value;
  uint64_t next_txid;
  int64_t time_ns;
} ws_run;

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

/* Take the records from `r` on that the lineage can take as they are (see the top), the
   lineage's end given by the arguments (its page hashes in `hashes`, `capacity` entries).
   Returns 0, or -1 when memory ran out (nothing taken, `hashes` unchanged). */
int ws_extend(ws_rec *r, uint64_t *hashes, uint32_t capacity, uint32_t db_size, uint64_t value,
              uint64_t next_txid, int64_t time_ns, uint64_t sync_seq, uint32_t page_size,
              uint64_t max_bytes, ws_run *out) {
  ws_lineage lin = {hashes, capacity, db_size, value, next_txid, time_ns, sync_seq, page_size,
                    max_bytes};
  ws_lineage *l = &lin;
  memset(out, 0, sizeof(*out));
  uint64_t n = 0, bodyLen = 0;
  uint32_t size = l->db_size;
  ws_rec *p;
  for (p = r; p && ws_takes(p, l, size); p = p->next) {
    if (p->seq <= l->sync_seq) continue;
    n++;
    bodyLen += (uint64_t)p->npages * (4 + p->page_size);
    size = p->db_size;
  }
  out->next = p;
  out->db_size = l->db_size;
  out->value = l->value;
  out->next_txid = l->next_txid;
  out->time_ns = l->time_ns;
  if (!n) {
    for (; r != p; r = r->next) out->last_seq = r->seq;
    return 0;
  }
  uint64_t len = n * (8 + 8 + WS_ENTRY_SIZE) + 8 + bodyLen;
  unsigned char *block = malloc(len);
  if (!block) {
    out->next = r;
    return -1;
  }
  out->block = block;
  out->block_len = len;
  out->seqs = (uint64_t *)block;
  out->offsets = out->seqs + n;
  out->entries_at = (n + n + 1) * 8;
  unsigned char *entries = block + out->entries_at, *body = entries + n * WS_ENTRY_SIZE;
  uint64_t at = 0;
  for (; r != p; r = r->next) {
    out->last_seq = r->seq;
    if (r->seq <= l->sync_seq) continue;
    uint32_t i = out->ncommit++;
    out->seqs[i] = r->seq;
    out->offsets[i] = at;
    ws_apply(r, l, entries + (size_t)i * WS_ENTRY_SIZE, body + at);
    at += (uint64_t)r->npages * (4 + r->page_size);
  }
  out->offsets[out->ncommit] = at;
  out->db_size = l->db_size;
  out->value = l->value;
  out->next_txid = l->next_txid;
  out->time_ns = l->time_ns;
  return 0;
}
