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

/* ---- make_data's plain records, parsed and encoded here ----------------------------------------

   A block of .jsonl lines (valid UTF-8: the caller checked) is read line by line. A line is
   *plain* when it is, byte for byte, one JSON object (nothing before '{' or after '}', a trailing
   '\r' aside) whose keys have no escapes, whose text key has a string value, and whose other values
   are strings, numbers, true/false/null or arrays/objects of those; its text is the last value of
   the text key (json.loads keeps the last of a repeated key). Strings are read as Python's json
   reads them: no raw control bytes, the escapes \" \\ \/ \b \f \n \r \t and \uXXXX, where a
   surrogate must be a high one followed by a low one. Anything else -- a lone surrogate, NaN,
   nesting deeper than MAX_DEPTH, invalid JSON, a document over max_size -- is *not plain*:
   the caller gives that line to Python, whose reading defines the result (and its error). Saying
   "not plain" is always safe; saying "plain" must mean json.loads agrees. */

#define MAX_DEPTH 32

static inline int is_ws(uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static inline const uint8_t *skip_ws(const uint8_t *p, const uint8_t *e) {
    while (p < e && is_ws(*p)) p++;
    return p;
}

static int hex4(const uint8_t *p, const uint8_t *e, uint32_t *v) {
    if (e - p < 4) return 0;
    uint32_t x = 0;
    for (int k = 0; k < 4; k++) {
        uint8_t c = p[k], l = c | 32;
        if (c >= '0' && c <= '9') x = x << 4 | (uint32_t)(c - '0');
        else if (l >= 'a' && l <= 'f') x = x << 4 | (uint32_t)(l - 'a' + 10);
        else return 0;
    }
    *v = x;
    return 1;
}

/* The JSON string whose opening quote is just before *pp: its UTF-8 bytes into out (when not
   NULL); *pp moves past the closing quote. Returns the number of bytes, -1 when not plain. */
static int64_t json_string(const uint8_t **pp, const uint8_t *e, uint8_t *out) {
    const uint8_t *p = *pp;
    int64_t m = 0;
    while (p < e) {
        uint8_t c = *p++;
        if (c == '"') { *pp = p; return m; }
        if (c < 0x20) return -1;
        if (c != '\\') { if (out) out[m] = c; m++; continue; }
        if (p >= e) return -1;
        uint32_t u;
        switch (c = *p++) {
        case '"': case '\\': case '/': u = c; break;
        case 'b': u = '\b'; break;
        case 'f': u = '\f'; break;
        case 'n': u = '\n'; break;
        case 'r': u = '\r'; break;
        case 't': u = '\t'; break;
        case 'u': {
            if (!hex4(p, e, &u)) return -1;
            p += 4;
            if (u >= 0xDC00 && u <= 0xDFFF) return -1;            /* a lone low surrogate */
            if (u >= 0xD800 && u <= 0xDBFF) {
                uint32_t lo;
                if (e - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, e, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                    return -1;                                     /* a lone high surrogate */
                p += 6;
                u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
            }
            break;
        }
        default: return -1;
        }
        if (out) {
            if (u < 0x80) out[m] = (uint8_t)u;
            else if (u < 0x800) { out[m] = (uint8_t)(0xC0 | u >> 6); out[m + 1] = (uint8_t)(0x80 | (u & 63)); }
            else if (u < 0x10000) {
                out[m] = (uint8_t)(0xE0 | u >> 12); out[m + 1] = (uint8_t)(0x80 | (u >> 6 & 63));
                out[m + 2] = (uint8_t)(0x80 | (u & 63));
            } else {
                out[m] = (uint8_t)(0xF0 | u >> 18); out[m + 1] = (uint8_t)(0x80 | (u >> 12 & 63));
                out[m + 2] = (uint8_t)(0x80 | (u >> 6 & 63)); out[m + 3] = (uint8_t)(0x80 | (u & 63));
            }
        }
        m += u < 0x80 ? 1 : u < 0x800 ? 2 : u < 0x10000 ? 3 : 4;
    }
    return -1;                                                      /* no closing quote */
}

static const uint8_t *json_value(const uint8_t *p, const uint8_t *e, int depth);

/* A number as json reads it: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][-+]?[0-9]+)?, ASCII digits. */
static const uint8_t *json_number(const uint8_t *p, const uint8_t *e) {
    if (p < e && *p == '-') p++;
    if (p >= e || *p < '0' || *p > '9') return NULL;
    if (*p == '0') p++;
    else while (p < e && *p >= '0' && *p <= '9') p++;
    if (p + 1 < e && *p == '.' && p[1] >= '0' && p[1] <= '9') {
        p += 2;
        while (p < e && *p >= '0' && *p <= '9') p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        const uint8_t *q = p + 1;
        if (q < e && (*q == '+' || *q == '-')) q++;
        if (q < e && *q >= '0' && *q <= '9') {
            while (q < e && *q >= '0' && *q <= '9') q++;
            p = q;
        }
    }
    return p;
}

static const uint8_t *json_word(const uint8_t *p, const uint8_t *e, const char *w, size_t n) {
    return (size_t)(e - p) >= n && memcmp(p, w, n) == 0 ? p + n : NULL;
}

/* Past the JSON value at p (a value other than the text), or NULL when not plain. */
static const uint8_t *json_value(const uint8_t *p, const uint8_t *e, int depth) {
    if (p >= e) return NULL;
    switch (*p) {
    case '"': p++; return json_string(&p, e, NULL) < 0 ? NULL : p;
    case 't': return json_word(p, e, "true", 4);
    case 'f': return json_word(p, e, "false", 5);
    case 'n': return json_word(p, e, "null", 4);
    case '[': case '{': {
        if (depth >= MAX_DEPTH) return NULL;
        uint8_t close = *p == '[' ? ']' : '}';
        int object = *p == '{';
        p = skip_ws(p + 1, e);
        if (p < e && *p == close) return p + 1;
        for (;;) {
            if (object) {
                if (p >= e || *p != '"') return NULL;
                p++;
                if (json_string(&p, e, NULL) < 0) return NULL;
                p = skip_ws(p, e);
                if (p >= e || *p != ':') return NULL;
                p = skip_ws(p + 1, e);
            }
            p = json_value(p, e, depth + 1);
            if (!p) return NULL;
            p = skip_ws(p, e);
            if (p >= e) return NULL;
            if (*p == close) return p + 1;
            if (*p != ',') return NULL;
            p = skip_ws(p + 1, e);
        }
    }
    default: return json_number(p, e);
    }
}

/* The text of the plain record line[0 .. e) into buf; its byte count, or -1 when not plain. */
static int64_t plain_text(const uint8_t *p, const uint8_t *e, const uint8_t *key, int64_t klen, uint8_t *buf) {
    int64_t len = -1;
    if (p >= e || *p != '{') return -1;
    p = skip_ws(p + 1, e);
    for (;;) {
        if (p >= e || *p != '"') return -1;
        const uint8_t *k = ++p;
        while (p < e && *p != '"' && *p != '\\' && *p >= 0x20) p++;
        if (p >= e || *p != '"') return -1;         /* an escape or a control byte in a key */
        int is_key = p - k == klen && memcmp(k, key, (size_t)klen) == 0;
        p = skip_ws(p + 1, e);
        if (p >= e || *p != ':') return -1;
        p = skip_ws(p + 1, e);
        if (is_key && p < e && *p == '"') {
            p++;
            len = json_string(&p, e, buf);
            if (len < 0) return -1;
        } else {
            if (!(p = json_value(p, e, 1))) return -1;
            if (is_key) len = -1;                   /* a text that is not a string (unless a later one is) */
        }
        p = skip_ws(p, e);
        if (p >= e) return -1;
        if (*p == '}') { p++; break; }
        if (*p != ',') return -1;
        p = skip_ws(p + 1, e);
    }
    return p == e ? len : -1;
}

/* Every line of the block data[0 .. n) that is not blank (only " \t\n\r\v\f"): line[d] gets its
   index in the block; a plain record's text is encoded into out (room for n + 1 ids) followed by
   a 0 and size[d] gets its number of ids with that 0; a line that is not plain, or whose document
   would exceed max_size ids, gets size[d] = -1 and no ids. line and size have room for the block's
   number of lines. Returns the number of non-blank lines, or -1 when out of memory; *n_ids gets
   the number of ids written. */
int64_t rb_trie_encode_plain_jsonl(const Trie *t, const uint8_t *data, int64_t n, const uint8_t *key,
                                   int64_t klen, int64_t max_size, void *out, int wide,
                                   int64_t *line, int64_t *size, int64_t *n_ids) {
    uint8_t *buf = malloc((size_t)(n > 0 ? n : 1));
    if (!buf) return -1;
    int64_t d = 0, m = 0, k = 0;
    for (const uint8_t *p = data, *end = data + n; p <= end; k++) {
        const uint8_t *nl = memchr(p, '\n', (size_t)(end - p));
        const uint8_t *e = nl ? nl : end, *q = p;
        while (q < e && (is_ws(*q) || *q == '\v' || *q == '\f')) q++;
        if (q < e) {
            const uint8_t *r = e;
            while (r > p && r[-1] == '\r') r--;
            int64_t len = plain_text(p, r, key, klen, buf);
            line[d] = k;
            size[d] = -1;
            if (len >= 0) {
                void *at = wide ? (void *)((int32_t *)out + m) : (void *)((uint16_t *)out + m);
                int64_t c = rb_trie_encode(t, buf, len, at, wide);
                if (c + 1 <= max_size) {
                    if (wide) ((int32_t *)out)[m + c] = 0; else ((uint16_t *)out)[m + c] = 0;
                    m += c + 1;
                    size[d] = c + 1;
                }
            }
            d++;
        }
        if (!nl) break;
        p = nl + 1;
    }
    free(buf);
    *n_ids = m;
    return d;
}
