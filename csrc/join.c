/*
** join.c -- the pieces of an object copied back to back into one new
** allocation, with the GIL released.
**
** A segment is assembled from its header, index and compressed body at the
** end of each encode.  Joined in Python, the copy of a multi-megabyte object
** (and the page faults of its fresh memory) holds the GIL for milliseconds,
** and every application thread that wants the GIL meanwhile waits for it.
** The caller frees the result with free().
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* n pieces of lens[i] bytes, `total` in all; NULL if out of memory. */
unsigned char *ws_join(const unsigned char *const *pieces, const uint64_t *lens, uint32_t n,
                       uint64_t total) {
  unsigned char *out = malloc(total ? (size_t)total : 1), *at = out;
  uint32_t i;
  if (!out) return 0;
  for (i = 0; i < n; i++) {
    memcpy(at, pieces[i], (size_t)lens[i]);
    at += lens[i];
  }
  return out;
}
