/* The World tokenizer's greedy longest byte match, as a flat byte trie (see world_trie.py).

   Encoding rule (tokenizer.py): at position i emit the id of the longest vocab token t with
   s[i : i + len(t)] == t, then i += len(t). Every single byte is a token, so each step advances.

   Layout. Trie nodes are numbered as they are created; node 0 is the root. tok[n] is the id of
   the token that ends at node n (-1: none). The children of node n, sorted by byte, are
   cbyte/cnode[first[n] .. first[n] + count[n]). Two dense tables skip the first two levels:
   single[b] is the id of the one-byte token b, pair[b0 << 8 | b1] the node of the two-byte prefix
   (-1: no token starts with it). A walk from there reads one sorted child list per byte.

   Build. Tokens are sorted by their bytes (then by id) and inserted in that order, so a node's
   children arrive in byte order and a later id of a repeated byte string overwrites an earlier one
   (the official tokenizer's rule, and our reference's). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t single[256];
    int32_t pair[65536];
    int32_t *tok, *first, *count, *cnode;
    uint8_t *cbyte;
    int64_t nodes;
} Trie;

static const uint8_t *g_blob;   /* qsort's comparison reads these (the build is single-threaded) */
static const int64_t *g_off;

static int by_bytes_then_id(const void *pa, const void *pb) {
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    int64_t la = g_off[a + 1] - g_off[a], lb = g_off[b + 1] - g_off[b];
    int c = memcmp(g_blob + g_off[a], g_blob + g_off[b], (size_t)(la < lb ? la : lb));
    if (c) return c;
    if (la != lb) return la < lb ? -1 : 1;
    return a < b ? -1 : a > b;
}

void rb_trie_free(Trie *t) {
    if (!t) return;
    free(t->tok); free(t->first); free(t->count); free(t->cnode); free(t->cbyte); free(t);
}

/* Token id i has the bytes blob[off[i] .. off[i + 1]) (empty: no token, e.g. id 0). Returns NULL
   when out of memory or when some single byte is not a token (the caller checks this first). */
Trie *rb_trie_build(const uint8_t *blob, const int64_t *off, int32_t n_ids) {
    int64_t total = off[n_ids];
    int32_t *order = malloc(sizeof(int32_t) * (size_t)(n_ids > 0 ? n_ids : 1));
    /* Per node while building: its last child (the one a sorted insert may extend) and siblings. */
    int64_t cap = total + 1;
    int32_t *last = malloc(sizeof(int32_t) * (size_t)cap), *next = malloc(sizeof(int32_t) * (size_t)cap);
    int32_t *head = malloc(sizeof(int32_t) * (size_t)cap);
    uint8_t *byte = malloc((size_t)cap);
    Trie *t = calloc(1, sizeof(Trie));
    if (t) {
        t->tok = malloc(sizeof(int32_t) * (size_t)cap);
        t->first = malloc(sizeof(int32_t) * (size_t)cap);
        t->count = calloc((size_t)cap, sizeof(int32_t));
        t->cnode = malloc(sizeof(int32_t) * (size_t)cap);
        t->cbyte = malloc((size_t)cap);
    }
    Trie *ok = NULL;
    if (!order || !last || !next || !head || !byte || !t || !t->tok || !t->first || !t->count || !t->cnode || !t->cbyte)
        goto done;
    int32_t m = 0;
    for (int32_t i = 0; i < n_ids; i++)
        if (off[i + 1] > off[i]) order[m++] = i;
    g_blob = blob; g_off = off;
    qsort(order, (size_t)m, sizeof(int32_t), by_bytes_then_id);
    int64_t nodes = 1;
    t->tok[0] = -1; head[0] = last[0] = -1;
    for (int32_t j = 0; j < m; j++) {
        int32_t id = order[j], node = 0;
        for (int64_t p = off[id]; p < off[id + 1]; p++) {
            uint8_t b = blob[p];
            int32_t c = last[node];
            if (c < 0 || byte[c] != b) {            /* sorted input: a new child comes last */
                c = (int32_t)nodes++;
                byte[c] = b; t->tok[c] = -1; head[c] = last[c] = next[c] = -1;
                if (last[node] < 0) head[node] = c; else next[last[node]] = c;
                last[node] = c;
                t->count[node]++;
            }
            node = c;
        }
        t->tok[node] = id;
    }
    /* Flatten each node's sibling list into its contiguous, sorted range. */
    int64_t k = 0;
    for (int64_t n = 0; n < nodes; n++) {
        t->first[n] = (int32_t)k;
        for (int32_t c = head[n]; c >= 0; c = next[c]) {
            t->cbyte[k] = byte[c];
            t->cnode[k++] = c;
        }
    }
    t->nodes = nodes;
    for (int b = 0; b < 256; b++) t->single[b] = -1;
    for (int i = 0; i < 65536; i++) t->pair[i] = -1;
    for (int32_t a = head[0]; a >= 0; a = next[a]) {
        t->single[byte[a]] = t->tok[a];
        for (int32_t c = head[a]; c >= 0; c = next[c]) t->pair[byte[a] << 8 | byte[c]] = c;
    }
    ok = t;
    for (int b = 0; b < 256; b++)
        if (t->single[b] < 0) ok = NULL;
done:
    free(order); free(last); free(next); free(head); free(byte);
    if (!ok) rb_trie_free(t);
    return ok;
}

static inline int32_t child(const Trie *t, int32_t node, uint8_t b) {
    const uint8_t *cb = t->cbyte + t->first[node];
    int32_t lo = 0, hi = t->count[node];
    while (hi - lo > 8) {                          /* wide nodes: halve, then scan the rest */
        int32_t mid = (lo + hi) >> 1;
        if (cb[mid] <= b) lo = mid; else hi = mid;
    }
    for (int32_t i = lo; i < hi; i++) {
        if (cb[i] == b) return t->cnode[t->first[node] + i];
        if (cb[i] > b) break;
    }
    return -1;
}

/* Token ids of s[0 .. n) into out (room for n ids: each token is at least one byte), as uint16
   (wide = 0) or int32 (wide = 1). Returns the number of ids. */
int64_t rb_trie_encode(const Trie *t, const uint8_t *s, int64_t n, void *out, int wide) {
    uint16_t *o16 = out;
    int32_t *o32 = out;
    int64_t i = 0, m = 0;
    while (i < n) {
        int32_t best = t->single[s[i]];
        int64_t len = 1;
        if (i + 1 < n) {
            int32_t node = t->pair[s[i] << 8 | s[i + 1]];
            if (node >= 0) {
                if (t->tok[node] >= 0) { best = t->tok[node]; len = 2; }
                for (int64_t j = i + 2; j < n; j++) {
                    node = child(t, node, s[j]);
                    if (node < 0) break;
                    if (t->tok[node] >= 0) { best = t->tok[node]; len = j + 1 - i; }
                }
            }
        }
        if (wide) o32[m++] = best; else o16[m++] = (uint16_t)best;
        i += len;
    }
    return m;
}

/* Texts s[off[d] .. off[d + 1]) for d < n_texts, encoded one after another into out (room for
   off[n_texts] - off[0] ids); counts[d] gets each text's number of ids. Returns the total. */
int64_t rb_trie_encode_many(const Trie *t, const uint8_t *s, const int64_t *off, int64_t n_texts,
                            void *out, int wide, int64_t *counts) {
    int64_t m = 0;
    for (int64_t d = 0; d < n_texts; d++) {
        void *at = wide ? (void *)((int32_t *)out + m) : (void *)((uint16_t *)out + m);
        counts[d] = rb_trie_encode(t, s + off[d], off[d + 1] - off[d], at, wide);
        m += counts[d];
    }
    return m;
}

int64_t rb_trie_nodes(const Trie *t) { return t->nodes; }
