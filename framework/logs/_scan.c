/*
 * ballast.logs._scan: the native scanner of the summary (see ballast/logs/native.py).
 *
 * It reads byte ranges of a log file on several threads, without the GIL, and sorts
 * each line into one of two kinds:
 *
 *   - a *simple* line: one flat JSON object written without whitespace, in well-formed
 *     UTF-8 with no control character or backslash anywhere, whose values are strings, numbers
 *     without an exponent (at most 18 integer digits, at most 48 characters) or
 *     true/false/null, and whose "timestamp", when it is a string, has one of the two
 *     forms Ballast writes ("YYYY-MM-DDTHH:MM:SS.ffffffZ", "YYYY-MM-DDTHH:MM:SSZ") with a
 *     date and time Python accepts. Every line Ballast writes without an escape is
 *     simple. Such a line means the same to every JSON reader, so it is read here and
 *     only counted: grouped into the three sets of groups of the DuckDB engine's query
 *     (ballast/logs/duck.py), with the same columns and aggregates;
 *   - any other line (blank, not JSON, nested, escaped, odd timestamp, ...)
 *     is handed back by its file offset and length, for the streaming engine's own
 *     reader to count.
 *
 * Memory is bounded, per thread: one read buffer (max_line + 4 MiB); at most MAX_GROUPS
 * groups over its three tables (32-byte slots, at most twice as many as groups), their
 * keys in at most MAX_ARENA bytes; the offsets of at most MAX_OTHER handed-back lines
 * (16 bytes each). Past a limit, or on a line longer than max_line, scan() returns None
 * and the caller uses another engine.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define NFIELDS 17
#define MAX_GROUPS (1 << 19)
#define MAX_ARENA (32 << 20)
#define MAX_OTHER (1 << 20)
#define MAX_THREADS 16
#define READ_CHUNK (4 << 20)
#define MAX_NAMES 32

/* The fields the summary reads (ballast.logs.groups.FIELDS; field_index() matches keys). */
enum {
    F_TIMESTAMP, F_LEVEL, F_EVENT, F_ROUTE, F_METHOD, F_STATUS, F_DURATION, F_NAME, F_KIND,
    F_ERROR_TYPE, F_SESSION_ID, F_STAGE, F_STATE, F_UPSTREAM, F_OPERATION, F_COUNT, F_REASON
};
/* The rare events' own columns of the lines set, in duck._LINES_KEY order. */
static const int RARE_FIELDS[8] = {
    F_NAME, F_KIND, F_ERROR_TYPE, F_STATE, F_UPSTREAM, F_OPERATION, F_COUNT, F_REASON
};

enum { V_ABSENT = 0, V_STRING, V_NUMBER, V_LITERAL };

typedef struct {
    const char *p; /* the value's JSON text (a string with its quotes) */
    uint32_t n;
    uint8_t kind;
} Value;

/* ---- growable byte buffer ---- */

typedef struct {
    char *data;
    size_t len, cap;
} Bytes;

static int bytes_reserve(Bytes *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data) return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

/* ---- keys: a sequence of typed parts, encoded as bytes ---- */

enum { K_NONE = 0, K_TEXT, K_INT, K_FALSE, K_TRUE };

typedef struct {
    char buf[1024];
    size_t len;
    int overflow;
} Key;

static inline void key_none(Key *k) {
    if (k->len + 1 > sizeof k->buf) { k->overflow = 1; return; }
    k->buf[k->len++] = K_NONE;
}

static inline void key_text(Key *k, const char *p, uint32_t n) {
    if (k->len + 5 + n > sizeof k->buf) { k->overflow = 1; return; }
    k->buf[k->len++] = K_TEXT;
    memcpy(k->buf + k->len, &n, 4);
    memcpy(k->buf + k->len + 4, p, n);
    k->len += 4 + n;
}

static inline void key_value(Key *k, const Value *v) {
    if (v->kind == V_ABSENT) key_none(k);
    else key_text(k, v->p, v->n);
}

static inline void key_int(Key *k, int64_t x) {
    if (k->len + 9 > sizeof k->buf) { k->overflow = 1; return; }
    k->buf[k->len++] = K_INT;
    memcpy(k->buf + k->len, &x, 8);
    k->len += 8;
}

static inline void key_bool(Key *k, int x) {
    if (k->len + 1 > sizeof k->buf) { k->overflow = 1; return; }
    k->buf[k->len++] = x ? K_TRUE : K_FALSE;
}

static inline uint64_t hash_bytes(const char *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL;
        h ^= h >> 32;
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, n);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL;
    h ^= h >> 29;
    return h;
}

/* ---- group tables: key -> count, first/last timestamp text, largest duration ---- */

typedef struct {
    uint64_t hash;
    uint32_t key_at; /* offset of the key in the table's arena (then, in a timed table,
                        the first and last timestamps: TIMES bytes) */
    uint32_t key_len;
    int64_t n;
    double dmax;     /* NAN: no duration */
} Entry;

/* lo length, lo text, hi length, hi text: the longest timestamp text is 29 bytes */
#define TIMES 60

/* One thread's limits, shared by its three tables. */
typedef struct {
    size_t groups, arena;
} Limits;

typedef struct {
    Entry *entries;
    size_t cap, used;
    Bytes arena;
    Limits *limits;
    int timed;
} Table;

static int table_init(Table *t, size_t cap, Limits *limits, int timed) {
    t->entries = calloc(cap, sizeof(Entry));
    if (!t->entries) return -1;
    t->cap = cap;
    t->used = 0;
    t->arena.data = NULL;
    t->arena.len = t->arena.cap = 0;
    t->limits = limits;
    t->timed = timed;
    return 0;
}

static void table_free(Table *t) {
    free(t->entries);
    free(t->arena.data);
    t->entries = NULL;
    t->arena.data = NULL;
}

static int table_grow(Table *t) {
    size_t cap = t->cap * 2;
    Entry *entries = calloc(cap, sizeof(Entry));
    if (!entries) return -1;
    for (size_t i = 0; i < t->cap; i++) {
        Entry *e = &t->entries[i];
        if (!e->key_len) continue;
        size_t j = e->hash & (cap - 1);
        while (entries[j].key_len) j = (j + 1) & (cap - 1);
        entries[j] = *e;
    }
    free(t->entries);
    t->entries = entries;
    t->cap = cap;
    return 0;
}

/* The entry of key (made if new), or NULL when out of memory or over MAX_GROUPS. */
static Entry *table_get(Table *t, const char *key, size_t len, uint64_t hash) {
    size_t mask = t->cap - 1, j = hash & mask;
    for (;;) {
        Entry *e = &t->entries[j];
        if (!e->key_len) break;
        if (e->hash == hash && e->key_len == len && memcmp(t->arena.data + e->key_at, key, len) == 0)
            return e;
        j = (j + 1) & mask;
    }
    size_t size = len + (t->timed ? TIMES : 0);
    if (t->limits->groups >= MAX_GROUPS || t->limits->arena + size > MAX_ARENA) return NULL;
    if ((t->used + 1) * 2 > t->cap) {
        if (table_grow(t) < 0) return NULL;
        return table_get(t, key, len, hash);
    }
    if (bytes_reserve(&t->arena, size) < 0) return NULL;
    Entry *e = &t->entries[j];
    memcpy(t->arena.data + t->arena.len, key, len);
    memset(t->arena.data + t->arena.len + len, 0, size - len);
    e->hash = hash;
    e->key_at = (uint32_t)t->arena.len;
    e->key_len = (uint32_t)len;
    e->n = 0;
    e->dmax = NAN;
    t->arena.len += size;
    t->used++;
    t->limits->groups++;
    t->limits->arena += size;
    return e;
}

/* min/max of the timestamp texts as bytes compare; a group's texts have one length (the
 * form is part of every key that carries them) */
static inline char *entry_times(const Table *t, const Entry *e) {
    return t->arena.data + e->key_at + e->key_len;
}

static inline void entry_time(Table *t, const Entry *e, const char *p, uint32_t n) {
    char *x = entry_times(t, e), *lo = x + 1, *hi = x + 31;
    if (!x[0] || memcmp(p, lo, n) < 0) {
        memcpy(lo, p, n);
        x[0] = (char)n;
    }
    if (!x[30] || memcmp(p, hi, n) > 0) {
        memcpy(hi, p, n);
        x[30] = (char)n;
    }
}

static inline void entry_duration(Entry *e, double d) {
    if (isnan(e->dmax) || d > e->dmax) e->dmax = d;
}

/* ---- the scan's settings and one thread's state ---- */

typedef struct {
    int fd;
    size_t max_line;
    int filtering;
    char since[26], until[26];
    int has_since, has_until;
    double min_ms, inv_log_gamma;
    int64_t zero_bucket;
    /* event texts with their quotes: "rare" events and those of them on the timeline */
    int n_rare, n_timed;
    char *rare[MAX_NAMES], *timed[MAX_NAMES];
    uint32_t rare_len[MAX_NAMES], timed_len[MAX_NAMES];
} Settings;

typedef struct {
    const Settings *s;
    int64_t start, end;
    Table lines, buckets, seconds;
    Limits limits;
    int64_t *other; /* pairs (offset, length) of handed-back lines */
    size_t n_other, cap_other;
    int64_t simple;
    int failed;   /* 1: declined (a line too long, too many groups or lines handed back) */
    int error;    /* errno of a failed read, or -1 out of memory */
} Work;

static int is_text(const Value *v, const char *text, size_t n) {
    return v->kind == V_STRING && v->n == n && memcmp(v->p, text, n) == 0;
}

static int in_names(const Value *v, char *const *names, const uint32_t *lens, int count) {
    if (v->kind != V_STRING) return 0;
    for (int i = 0; i < count; i++)
        if (v->n == lens[i] && memcmp(v->p, names[i], lens[i]) == 0) return 1;
    return 0;
}

static int field_index(const char *p, size_t n) {
    switch (n) {
    case 4: if (!memcmp(p, "name", 4)) return F_NAME;
            if (!memcmp(p, "kind", 4)) return F_KIND;
            return -1;
    case 5: if (!memcmp(p, "level", 5)) return F_LEVEL;
            if (!memcmp(p, "event", 5)) return F_EVENT;
            if (!memcmp(p, "route", 5)) return F_ROUTE;
            if (!memcmp(p, "stage", 5)) return F_STAGE;
            if (!memcmp(p, "state", 5)) return F_STATE;
            if (!memcmp(p, "count", 5)) return F_COUNT;
            return -1;
    case 6: if (!memcmp(p, "method", 6)) return F_METHOD;
            if (!memcmp(p, "status", 6)) return F_STATUS;
            if (!memcmp(p, "reason", 6)) return F_REASON;
            return -1;
    case 8: if (!memcmp(p, "upstream", 8)) return F_UPSTREAM;
            return -1;
    case 9: if (!memcmp(p, "timestamp", 9)) return F_TIMESTAMP;
            if (!memcmp(p, "operation", 9)) return F_OPERATION;
            return -1;
    case 10: if (!memcmp(p, "error_type", 10)) return F_ERROR_TYPE;
             if (!memcmp(p, "session_id", 10)) return F_SESSION_ID;
             return -1;
    case 11: if (!memcmp(p, "duration_ms", 11)) return F_DURATION;
             return -1;
    default: return -1;
    }
}

/* Whether [s, e) is well-formed UTF-8 (RFC 3629: no overlong form, no surrogate, nothing
 * over U+10FFFF), as the JSON readers require. */
static int valid_utf8(const unsigned char *s, const unsigned char *e) {
    while (s < e) {
        unsigned c = *s;
        if (c < 0x80) {
            s++;
        } else if (c >= 0xC2 && c <= 0xDF) {
            if (e - s < 2 || (s[1] & 0xC0) != 0x80) return 0;
            s += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (e - s < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
            if ((c == 0xE0 && s[1] < 0xA0) || (c == 0xED && s[1] > 0x9F)) return 0;
            s += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (e - s < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xF0 && s[1] < 0x90) || (c == 0xF4 && s[1] > 0x8F)) return 0;
            s += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* Whether [p, end) holds no control character and no backslash, and is UTF-8: then every
 * '"' in it delimits a string and every string is its own text. */
static inline int plain_bytes(const char *p, const char *end) {
    const char *start = p;
    int high = 0;
#ifdef __SSE2__
    const __m128i backslash = _mm_set1_epi8('\\'), last_control = _mm_set1_epi8(0x1F);
    __m128i bad = _mm_setzero_si128(), any = _mm_setzero_si128();
    for (; end - p >= 16; p += 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)p);
        /* x <= 0x1F unsigned: max(x, 0x1F) == 0x1F */
        __m128i control = _mm_cmpeq_epi8(_mm_max_epu8(x, last_control), last_control);
        bad = _mm_or_si128(bad, _mm_or_si128(_mm_cmpeq_epi8(x, backslash), control));
        any = _mm_or_si128(any, x);
    }
    if (_mm_movemask_epi8(bad)) return 0;
    high = _mm_movemask_epi8(any);
#endif
    for (; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        if (c < 0x20 || c == '\\') return 0;
        high |= c & 0x80;
    }
    return !high || valid_utf8((const unsigned char *)start, (const unsigned char *)end);
}

/* A string's end, just past its closing quote (the line's bytes are plain_bytes), or
 * NULL. p points at the opening quote. */
static inline const char *string_end(const char *p, const char *end) {
    p++;
#ifdef __SSE2__
    const __m128i quote = _mm_set1_epi8('"');
    while (end - p >= 16) {
        int mask = _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)p), quote));
        if (mask) return p + __builtin_ctz((unsigned)mask) + 1;
        p += 16;
    }
#endif
    const char *q = memchr(p, '"', (size_t)(end - p));
    return q ? q + 1 : NULL;
}

static inline int is_digit(char c) { return c >= '0' && c <= '9'; }

/* Read one simple line into vals; 0 if the line is not simple. */
static int read_simple(const char *p, const char *end, Value *vals) {
    memset(vals, 0, sizeof(Value) * NFIELDS);
    if (p >= end || *p != '{' || !plain_bytes(p, end)) return 0;
    p++;
    if (p < end && *p == '}') return p + 1 == end;
    for (;;) {
        if (p >= end || *p != '"') return 0;
        const char *key = p + 1;
        const char *after = string_end(p, end);
        if (!after) return 0;
        size_t key_len = (size_t)(after - 1 - key);
        p = after;
        if (p >= end || *p != ':') return 0;
        p++;
        if (p >= end) return 0;
        const char *v = p;
        uint8_t kind;
        char c = *p;
        if (c == '"') {
            p = string_end(p, end);
            if (!p) return 0;
            kind = V_STRING;
        } else if (c == '-' || is_digit(c)) {
            if (c == '-') p++;
            if (p >= end || !is_digit(*p)) return 0;
            const char *digits = p;
            if (*p == '0') p++;
            else while (p < end && is_digit(*p)) p++;
            if (p - digits > 18) return 0;
            if (p < end && *p == '.') {
                p++;
                if (p >= end || !is_digit(*p)) return 0;
                while (p < end && is_digit(*p)) p++;
            }
            if (p < end && (*p == 'e' || *p == 'E')) return 0;
            if (p - v > 48) return 0;
            kind = V_NUMBER;
        } else if (c == 't' && end - p >= 4 && !memcmp(p, "true", 4)) {
            p += 4; kind = V_LITERAL;
        } else if (c == 'f' && end - p >= 5 && !memcmp(p, "false", 5)) {
            p += 5; kind = V_LITERAL;
        } else if (c == 'n' && end - p >= 4 && !memcmp(p, "null", 4)) {
            p += 4; kind = V_LITERAL;
        } else {
            return 0;
        }
        int f = field_index(key, key_len);
        if (f >= 0 && vals[f].kind == V_ABSENT) { /* a repeated key: the first counts */
            vals[f].p = v;
            vals[f].n = (uint32_t)(p - v);
            vals[f].kind = kind;
        }
        if (p >= end) return 0;
        if (*p == ',') { p++; continue; }
        if (*p == '}') return p + 1 == end;
        return 0;
    }
}

static inline int two(const char *p) { return (p[0] - '0') * 10 + (p[1] - '0'); }

/* 1 or 2: the timestamp's form (with fraction, without); 0 not a string; -1 any other
 * string (or an impossible date or time): the line is not simple. */
static int time_shape(const Value *ts) {
    if (ts->kind != V_STRING) return 0;
    const char *p = ts->p + 1; /* after the quote */
    int shape;
    if (ts->n == 29) shape = 1;
    else if (ts->n == 22) shape = 2;
    else return -1;
    static const char form[] = "dddd-dd-ddTdd:dd:dd";
    for (int i = 0; i < 19; i++) {
        if (form[i] == 'd') { if (!is_digit(p[i])) return -1; }
        else if (p[i] != form[i]) return -1;
    }
    if (shape == 1) {
        if (p[19] != '.') return -1;
        for (int i = 20; i < 26; i++) if (!is_digit(p[i])) return -1;
        if (p[26] != 'Z') return -1;
    } else if (p[19] != 'Z') {
        return -1;
    }
    int year = two(p) * 100 + two(p + 2), month = two(p + 5), day = two(p + 8);
    if (year < 1 || month < 1 || month > 12 || day < 1) return -1;
    static const int days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if (day > days[month - 1] + (month == 2 && leap)) return -1;
    if (two(p + 11) > 23 || two(p + 14) > 59 || two(p + 17) > 59) return -1;
    return shape;
}

static const double POW10[] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
                               1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* The double a number's text (as read_simple accepts it) stands for, correctly rounded:
 * exact arithmetic when the digits fit in 53 bits and the scale is at most 10^22 (both
 * operands exact, one rounding), else strtod. */
static double number(const char *p, uint32_t n) {
    const char *q = p, *end = p + n;
    int negative = *q == '-';
    q += negative;
    uint64_t digits = 0;
    int count = 0, scale = 0;
    for (; q < end; q++) {
        if (*q == '.') { scale = (int)(end - q - 1); continue; }
        digits = digits * 10 + (uint64_t)(*q - '0');
        if (++count > 15) break;
    }
    if (q == end && scale <= 22) {
        double x = (double)digits / POW10[scale];
        return negative ? -x : x;
    }
    char text[64];
    memcpy(text, p, n);
    text[n] = 0;
    return strtod(text, NULL);
}

static int hand_back(Work *w, int64_t offset, int64_t len) {
    if (w->n_other >= MAX_OTHER) return -1;
    if (w->n_other == w->cap_other) {
        size_t cap = w->cap_other ? w->cap_other * 2 : 1024;
        int64_t *other = realloc(w->other, cap * 2 * sizeof(int64_t));
        if (!other) return -1;
        w->other = other;
        w->cap_other = cap;
    }
    w->other[2 * w->n_other] = offset;
    w->other[2 * w->n_other + 1] = len;
    w->n_other++;
    return 0;
}

static const char REQUEST[] = "\"http.request\"";
static const char MUTATION_FAILED[] = "\"session.mutation_failed\"";
static const char STAGE_EVENT[] = "\"finalize.stage\"";

/* Count one line; -1 on a limit (the work is then failed). */
static int count_line(Work *w, const char *p, const char *end, int64_t offset) {
    const Settings *s = w->s;
    Value v[NFIELDS];
    int shape = -1;
    if (read_simple(p, end, v)) shape = time_shape(&v[F_TIMESTAMP]);
    if (shape < 0) return hand_back(w, offset, end - p);
    w->simple++;
    const Value *ts = &v[F_TIMESTAMP], *ev = &v[F_EVENT];
    int isreq = is_text(ev, REQUEST, sizeof REQUEST - 1);
    int rare = !isreq && in_names(ev, s->rare, s->rare_len, s->n_rare);
    int win = 1;
    if (s->filtering) {
        if (shape == 0) {
            win = 0;
        } else {
            char tk[26];
            memcpy(tk, ts->p + 1, 19);
            if (shape == 1) memcpy(tk + 19, ts->p + 20, 7);
            else memcpy(tk + 19, ".000000", 7);
            if (s->has_since && memcmp(tk, s->since, 26) < 0) win = 0;
            if (s->has_until && memcmp(tk, s->until, 26) >= 0) win = 0;
        }
    }
    /* the duration, as TRY_CAST(text AS DOUBLE) reads a number's text */
    int has_d = 0;
    double d = 0;
    if (v[F_DURATION].kind == V_NUMBER) {
        double d0 = number(v[F_DURATION].p, v[F_DURATION].n);
        if (d0 >= 0 && d0 < 1e15) { has_d = 1; d = d0; }
    }

    /* the lines set: duck._LINES_KEY */
    Key k;
    k.len = 0;
    k.overflow = 0;
    key_bool(&k, 0); /* bad */
    key_value(&k, ev);
    key_value(&k, &v[F_LEVEL]);
    key_int(&k, shape);
    if (isreq) {
        key_value(&k, &v[F_ROUTE]);
        key_value(&k, &v[F_METHOD]);
        key_value(&k, &v[F_STATUS]);
    } else if (rare) {
        key_value(&k, &v[F_ROUTE]);
        key_none(&k);
        key_value(&k, &v[F_STATUS]);
    } else {
        key_none(&k); key_none(&k); key_none(&k);
    }
    if (rare) {
        key_value(&k, &v[F_STAGE]);
        for (int i = 0; i < 8; i++) key_value(&k, &v[RARE_FIELDS[i]]);
        if (is_text(ev, MUTATION_FAILED, sizeof MUTATION_FAILED - 1)) key_value(&k, &v[F_SESSION_ID]);
        else key_none(&k);
        if (shape && in_names(ev, s->timed, s->timed_len, s->n_timed)) key_text(&k, ts->p + 1, 19);
        else key_none(&k);
    } else {
        for (int i = 0; i < 11; i++) key_none(&k);
    }
    key_bool(&k, win);
    if (k.overflow) { /* a long value: counted by the streaming engine */
        w->simple--;
        return hand_back(w, offset, end - p);
    }
    Entry *e = table_get(&w->lines, k.buf, k.len, hash_bytes(k.buf, k.len));
    if (!e) return -1;
    e->n++;
    if (shape) entry_time(&w->lines, e, ts->p, ts->n);

    if (!win) return 0;
    /* the buckets set: duck._BUCKETS_KEY, kept where the summary uses it */
    int staged = !isreq && is_text(ev, STAGE_EVENT, sizeof STAGE_EVENT - 1);
    if (has_d && (isreq || staged)) {
        int64_t b = d >= s->min_ms ? (int64_t)ceil(log(d) * s->inv_log_gamma) : s->zero_bucket;
        k.len = 0;
        key_value(&k, ev);
        if (isreq) { key_value(&k, &v[F_ROUTE]); key_none(&k); }
        else { key_none(&k); key_value(&k, &v[F_STAGE]); }
        key_int(&k, b);
        key_bool(&k, 1);
        if (k.overflow) return -1;
        e = table_get(&w->buckets, k.buf, k.len, hash_bytes(k.buf, k.len));
        if (!e) return -1;
        e->n++;
        entry_duration(e, d);
    }
    /* the seconds set: duck._SECONDS_KEY, requests only */
    if (isreq && shape) {
        k.len = 0;
        key_text(&k, ts->p + 1, 19);
        key_bool(&k, 1);
        key_value(&k, &v[F_STATUS]);
        key_bool(&k, 1);
        if (k.overflow) return -1;
        e = table_get(&w->seconds, k.buf, k.len, hash_bytes(k.buf, k.len));
        if (!e) return -1;
        e->n++;
    }
    return 0;
}

static void *scan_range(void *arg) {
    Work *w = arg;
    const Settings *s = w->s;
    size_t cap = s->max_line + READ_CHUNK + 1;
    char *buf = malloc(cap);
    if (!buf) { w->error = -1; w->failed = 1; return NULL; }
    int64_t at = w->start;      /* file offset of buf[0] */
    size_t have = 0;            /* bytes in buf */
    int64_t pos = w->start;     /* file offset of the next byte to read */
    int eof = 0;
    while (!w->failed) {
        if (!eof && have < cap) {
            size_t want = cap - have;
            if ((int64_t)want > w->end - pos) want = (size_t)(w->end - pos);
            if (want > READ_CHUNK) want = READ_CHUNK;
            if (want == 0) {
                eof = 1;
            } else {
                ssize_t got = pread(s->fd, buf + have, want, pos);
                if (got < 0) {
                    if (errno == EINTR) continue;
                    w->error = errno; w->failed = 1; break;
                }
                if (got == 0) eof = 1;
                have += (size_t)got;
                pos += got;
            }
        }
        /* count every whole line in the buffer */
        const char *p = buf, *stop = buf + have;
        size_t skip = (at == 0 && have >= 3 && !memcmp(buf, "\xEF\xBB\xBF", 3)) ? 3 : 0;
        p += skip;
        for (;;) {
            const char *nl = memchr(p, '\n', (size_t)(stop - p));
            if (!nl) break;
            if ((size_t)(nl - p) > s->max_line) { w->failed = 1; break; }
            if (count_line(w, p, nl, at + (p - buf)) < 0) { w->failed = 1; break; }
            p = nl + 1;
        }
        if (w->failed) break;
        size_t rest = (size_t)(stop - p);
        if (rest > s->max_line) { w->failed = 1; break; }
        if (eof) {
            if (rest && count_line(w, p, stop, at + (p - buf)) < 0) w->failed = 1;
            break;
        }
        memmove(buf, p, rest);
        at += (int64_t)(p - buf);
        have = rest;
    }
    free(buf);
    return NULL;
}

/* ---- results as Python objects ---- */

static PyObject *key_tuple(const char *p, size_t len) {
    PyObject *items = PyList_New(0);
    if (!items) return NULL;
    const char *end = p + len;
    while (p < end) {
        PyObject *item;
        char tag = *p++;
        if (tag == K_NONE) {
            item = Py_NewRef(Py_None);
        } else if (tag == K_TEXT) {
            uint32_t n;
            memcpy(&n, p, 4);
            item = PyUnicode_DecodeUTF8(p + 4, n, "strict");
            p += 4 + n;
        } else if (tag == K_INT) {
            int64_t x;
            memcpy(&x, p, 8);
            item = PyLong_FromLongLong(x);
            p += 8;
        } else {
            item = Py_NewRef(tag == K_TRUE ? Py_True : Py_False);
        }
        if (!item || PyList_Append(items, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(items);
            return NULL;
        }
        Py_DECREF(item);
    }
    PyObject *tuple = PyList_AsTuple(items);
    Py_DECREF(items);
    return tuple;
}

/* rows: key parts + (n, lo, hi) for the lines set, + (n, dmax) for buckets, + (n,) for seconds */
static PyObject *table_rows(const Table *t, int what) {
    PyObject *rows = PyList_New(0);
    if (!rows) return NULL;
    for (size_t i = 0; i < t->cap; i++) {
        const Entry *e = &t->entries[i];
        if (!e->key_len) continue;
        PyObject *key = key_tuple(t->arena.data + e->key_at, e->key_len);
        if (!key) goto fail;
        PyObject *extra;
        if (what == 0) {
            const char *x = entry_times(t, e);
            if (x[0])
                extra = Py_BuildValue("(Ls#s#)", (long long)e->n, x + 1, (Py_ssize_t)x[0], x + 31,
                                      (Py_ssize_t)x[30]);
            else
                extra = Py_BuildValue("(LOO)", (long long)e->n, Py_None, Py_None);
        } else if (what == 1) {
            extra = Py_BuildValue("(Ld)", (long long)e->n, e->dmax);
        } else {
            extra = Py_BuildValue("(L)", (long long)e->n);
        }
        if (!extra) { Py_DECREF(key); goto fail; }
        PyObject *row = PySequence_Concat(key, extra);
        Py_DECREF(key);
        Py_DECREF(extra);
        if (!row || PyList_Append(rows, row) < 0) { Py_XDECREF(row); goto fail; }
        Py_DECREF(row);
    }
    return rows;
fail:
    Py_DECREF(rows);
    return NULL;
}

/* merge table `from` into `into`; -1 on a limit */
static int table_merge(Table *into, const Table *from) {
    for (size_t i = 0; i < from->cap; i++) {
        const Entry *f = &from->entries[i];
        if (!f->key_len) continue;
        Entry *e = table_get(into, from->arena.data + f->key_at, f->key_len, f->hash);
        if (!e) return -1;
        e->n += f->n;
        if (from->timed) {
            const char *x = entry_times(from, f);
            if (x[0]) {
                entry_time(into, e, x + 1, (uint32_t)x[0]);
                entry_time(into, e, x + 31, (uint32_t)x[30]);
            }
        }
        if (!isnan(f->dmax)) entry_duration(e, f->dmax);
    }
    return 0;
}

/* Point names/lens at the bytes of seq's items; *held keeps them alive (the caller
 * releases it after the scan). */
static int copy_names(PyObject *seq, char **names, uint32_t *lens, int *count, PyObject **held) {
    PyObject *fast = PySequence_Fast(seq, "event names: a sequence of bytes");
    if (!fast) return -1;
    *held = fast;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_NAMES) {
        PyErr_SetString(PyExc_ValueError, "too many event names");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        char *p;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(item, &p, &len) < 0) return -1;
        names[i] = p;
        lens[i] = (uint32_t)len;
    }
    *count = (int)n;
    return 0;
}

static PyObject *scan_ranges(const Settings *sp, PyObject *ranges);

static PyObject *scan(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"fd", "ranges", "max_line", "since", "until", "rare", "timed", "min_ms",
                             "inv_log_gamma", "zero_bucket", NULL};
    int fd;
    PyObject *ranges, *since, *until, *rare, *timed;
    Py_ssize_t max_line;
    Settings s;
    memset(&s, 0, sizeof s);
    long long zero;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOnOOOOddL", kwlist, &fd, &ranges, &max_line, &since,
                                     &until, &rare, &timed, &s.min_ms, &s.inv_log_gamma, &zero))
        return NULL;
    s.fd = fd;
    s.max_line = (size_t)max_line;
    s.zero_bucket = zero;
    PyObject *bounds[2] = {since, until};
    char *dest[2] = {s.since, s.until};
    int *has[2] = {&s.has_since, &s.has_until};
    for (int i = 0; i < 2; i++) {
        if (bounds[i] == Py_None) continue;
        char *p;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(bounds[i], &p, &len) < 0) return NULL;
        if (len != 26) {
            PyErr_SetString(PyExc_ValueError, "since/until: 26 bytes, YYYY-MM-DDTHH:MM:SS.ffffff");
            return NULL;
        }
        memcpy(dest[i], p, 26);
        *has[i] = 1;
        s.filtering = 1;
    }
    PyObject *held_rare = NULL, *held_timed = NULL;
    if (copy_names(rare, s.rare, s.rare_len, &s.n_rare, &held_rare) < 0 ||
        copy_names(timed, s.timed, s.timed_len, &s.n_timed, &held_timed) < 0) {
        Py_XDECREF(held_rare);
        Py_XDECREF(held_timed);
        return NULL;
    }
    PyObject *result = scan_ranges(&s, ranges);
    Py_DECREF(held_rare);
    Py_DECREF(held_timed);
    return result;
}

static PyObject *scan_ranges(const Settings *sp, PyObject *ranges) {
    PyObject *fast = PySequence_Fast(ranges, "ranges: a sequence of (start, end)");
    if (!fast) return NULL;
    Py_ssize_t n_work = PySequence_Fast_GET_SIZE(fast);
    if (n_work < 1 || n_work > MAX_THREADS) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "ranges: 1 to 16 of them");
        return NULL;
    }
    Work work[MAX_THREADS];
    memset(work, 0, sizeof work);
    int ok = 1;
    for (Py_ssize_t i = 0; i < n_work; i++) {
        long long a, b;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "LL", &a, &b)) { ok = 0; break; }
        work[i].s = sp;
        work[i].start = a;
        work[i].end = b;
        Limits *limits = &work[i].limits;
        if (table_init(&work[i].lines, 1024, limits, 1) < 0 || table_init(&work[i].buckets, 1024, limits, 0) < 0 ||
            table_init(&work[i].seconds, 1024, limits, 0) < 0) {
            PyErr_NoMemory();
            ok = 0;
            n_work = i + 1;
            break;
        }
    }
    Py_DECREF(fast);
    PyObject *result = NULL;
    if (ok) {
        pthread_t threads[MAX_THREADS];
        int started[MAX_THREADS] = {0};
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 1; i < n_work; i++)
            started[i] = pthread_create(&threads[i], NULL, scan_range, &work[i]) == 0;
        scan_range(&work[0]);
        for (Py_ssize_t i = 1; i < n_work; i++) {
            if (started[i]) pthread_join(threads[i], NULL);
            else scan_range(&work[i]);
        }
        Py_END_ALLOW_THREADS
        int declined = 0, error = 0;
        for (Py_ssize_t i = 0; i < n_work; i++) {
            if (work[i].error) error = work[i].error;
            if (work[i].failed) declined = 1;
        }
        for (Py_ssize_t i = 1; i < n_work && !declined; i++) {
            if (table_merge(&work[0].lines, &work[i].lines) < 0 ||
                table_merge(&work[0].buckets, &work[i].buckets) < 0 ||
                table_merge(&work[0].seconds, &work[i].seconds) < 0)
                declined = 1;
        }
        if (error > 0) {
            errno = error;
            PyErr_SetFromErrno(PyExc_OSError);
        } else if (error < 0) {
            PyErr_NoMemory();
        } else if (declined) {
            result = Py_NewRef(Py_None);
        } else {
            PyObject *lines = table_rows(&work[0].lines, 0);
            PyObject *buckets = lines ? table_rows(&work[0].buckets, 1) : NULL;
            PyObject *seconds = buckets ? table_rows(&work[0].seconds, 2) : NULL;
            size_t n_other = 0;
            for (Py_ssize_t i = 0; i < n_work; i++) n_other += work[i].n_other;
            PyObject *other = seconds ? PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n_other * 16)) : NULL;
            if (other) {
                char *out = PyBytes_AS_STRING(other);
                for (Py_ssize_t i = 0; i < n_work; i++) {
                    if (!work[i].n_other) continue; /* other is NULL then */
                    memcpy(out, work[i].other, work[i].n_other * 16);
                    out += work[i].n_other * 16;
                }
                long long simple = 0;
                for (Py_ssize_t i = 0; i < n_work; i++) simple += work[i].simple;
                result = Py_BuildValue("(OOOOL)", lines, buckets, seconds, other, simple);
            }
            Py_XDECREF(lines);
            Py_XDECREF(buckets);
            Py_XDECREF(seconds);
            Py_XDECREF(other);
        }
    }
    for (Py_ssize_t i = 0; i < n_work; i++) {
        table_free(&work[i].lines);
        table_free(&work[i].buckets);
        table_free(&work[i].seconds);
        free(work[i].other);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_VARARGS | METH_KEYWORDS,
     "scan(fd, ranges, max_line, since, until, rare, timed, min_ms, inv_log_gamma, zero_bucket)\n"
     "-> (lines, buckets, seconds, other, simple) or None: see ballast/logs/native.py."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ballast.logs._scan", "The native scanner of the log summary.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void) {
    return PyModule_Create(&module);
}
