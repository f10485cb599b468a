/*
 * Test double of librkllmrt 1.2.3. It exports the same 15 C entry points, reads a small text
 * "model" file (format in README.md, "Model files") and imitates the runtime's observable
 * behaviour: blocking runs with one callback per token at a configured rate, WAITING for split
 * UTF-8, FINISH with perf, pause by callback return 1, abort from another thread, keep_history and
 * KV accounting, NPU memory domains, and loud reports of API misuse that the real library would
 * turn into crashes or silent garbage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "rkllm.h"

#define EXPORT __attribute__((visibility("default")))

enum {
    MAX_DOMAINS = 8,
    MAX_CONTEXT_LIMIT = 16384,
    MAX_TOKEN_BYTES = 255,
    MAX_VOCAB = 4096,
    MAX_MODEL_FILE_BYTES = 1 << 20,
    MAX_TOOL_NAME_BYTES = 200,
    DEFAULT_EMBD_SIZE = 1536,
    MAX_EMBD_SIZE = 16384,
    ERR_LEN = 512,
};

static const double DEFAULT_DOMAIN_MB = 4096.0;
static const char MODEL_FORMAT[] = "rkllm-double/1";
static const char PROMPT_CACHE_MAGIC[] = "rkllm-double-prompt-cache/1";

typedef struct {
    char *name;
    char *toolkit_version;
    char *target_platform;
    int max_context;
    double memory_mb;
    double tokens_per_second;
    double prefill_ms_per_token;
    int reply_tokens;
    char **vocab;
    int vocab_len;
    bool think;
    int split_utf8_every;
    int fragment_every;
    int error_at_token;
    int segv_at_token;
    bool fail_init;
    int slow_abort_ms;
    int hang_at_token;
    bool hang_ignores_abort;
    char *hang_trigger; /* NULL: every run hangs; else only runs whose prompt contains it */
    int embd_size;      /* floats per token in RKLLM_INFER_GET_LAST_HIDDEN_LAYER results */
} model_spec;

typedef struct lora_entry {
    char *name;
    struct lora_entry *next;
} lora_entry;

struct double_handle {
    struct double_handle *next; /* registry link, guarded by registry_lock */
    unsigned id;
    pthread_mutex_t lock; /* guards every field below that changes after init */
    pthread_cond_t wake;  /* signalled on abort and when a run ends */
    model_spec model;
    char *model_path;
    RKLLMParam params;
    int max_context;
    LLMResultCallback callback;
    bool running;
    pthread_t run_thread;
    bool abort_requested;
    struct timespec abort_effective;
    int kv_len;
    /* FNV-1a over the text in the KV cache (prompts and replies, in order): replies depend on it, so a
     * conversation continued on the wrong handle, or re-sent with different history, answers differently. */
    uint32_t kv_hash;
    int system_tokens;
    char *tool_name;
    lora_entry *loras;
    char *prompt_cache_path;
    /* Hidden states of the last GET_LAST_HIDDEN_LAYER run: valid only inside its callback, poisoned
     * (NaN) as soon as the callback returns, so a binding that kept the pointer reads garbage. */
    float *hidden;
    size_t hidden_floats;
};

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct double_handle *registry;
static unsigned next_handle_id = 1;
static double domain_used_mb[MAX_DOMAINS];
static pthread_once_t fork_handlers_once = PTHREAD_ONCE_INIT;

/* ---------------------------------------------------------------- logging */

static void append_log(const char *kind, unsigned handle_id, const char *fmt, va_list ap)
{
    const char *path = getenv("RKLLM_DOUBLE_LOG");
    if (!path || !*path)
        return;
    char line[2048];
    int head = snprintf(line, sizeof line, "%s pid=%d handle=%u ", kind, (int)getpid(), handle_id);
    vsnprintf(line + head, sizeof line - (size_t)head - 1, fmt, ap);
    size_t len = strlen(line);
    line[len++] = '\n';
    /* One O_APPEND write per line keeps lines whole across threads and processes. */
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    if (write(fd, line, len) < 0)
        fprintf(stderr, "W rkllm-double: cannot append to %s: %s\n", path, strerror(errno));
    close(fd);
}

__attribute__((format(printf, 3, 4))) static void log_event(const char *kind, unsigned handle_id,
                                                            const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    append_log(kind, handle_id, fmt, ap);
    va_end(ap);
}

__attribute__((format(printf, 2, 3))) static void violation(unsigned handle_id, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "E rkllm-double: VIOLATION handle=%u: ", handle_id);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    va_start(ap, fmt);
    append_log("VIOLATION", handle_id, fmt, ap);
    va_end(ap);
}

/* ---------------------------------------------------------------- time */

static struct timespec now_mono(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t;
}

static struct timespec ts_add_ms(struct timespec t, double ms)
{
    long long ns = (long long)t.tv_nsec + llround(ms * 1e6);
    t.tv_sec += (time_t)(ns / 1000000000LL);
    t.tv_nsec = (long)(ns % 1000000000LL);
    return t;
}

static int ts_cmp(struct timespec a, struct timespec b)
{
    if (a.tv_sec != b.tv_sec)
        return a.tv_sec < b.tv_sec ? -1 : 1;
    if (a.tv_nsec != b.tv_nsec)
        return a.tv_nsec < b.tv_nsec ? -1 : 1;
    return 0;
}

static double ms_between(struct timespec from, struct timespec to)
{
    return (double)(to.tv_sec - from.tv_sec) * 1e3 + (double)(to.tv_nsec - from.tv_nsec) / 1e6;
}

/* ---------------------------------------------------------------- text helpers */

static int token_count(const char *text)
{
    size_t bytes = strlen(text);
    return bytes == 0 ? 1 : (int)((bytes + 3) / 4);
}

static const uint32_t FNV_BASIS = 2166136261u;

static uint32_t fnv1a_continue(uint32_t hash, const char *text)
{
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        hash ^= *p;
        hash *= 16777619u;
    }
    return hash;
}

static bool utf8_valid(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        unsigned char c = p[i];
        size_t extra = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : 9;
        if (extra == 9 || i + extra >= len)
            return false;
        for (size_t k = 1; k <= extra; k++)
            if ((p[i + k] & 0xC0) != 0x80)
                return false;
        i += extra + 1;
    }
    return true;
}

/* Index of the first lead byte of a multi-byte character, or -1 for pure ASCII. */
static int first_multibyte_lead(const char *s)
{
    for (int i = 0; s[i]; i++)
        if ((unsigned char)s[i] >= 0xC0)
            return i;
    return -1;
}

/* Character boundary nearest the middle (never 0 or len); 0 when the text is a single character. */
static size_t middle_char_boundary(const char *s, size_t len)
{
    size_t best = 0;
    for (size_t i = 1; i < len; i++) {
        if (((unsigned char)s[i] & 0xC0) == 0x80)
            continue;
        size_t dist_i = i > len / 2 ? i - len / 2 : len / 2 - i;
        size_t dist_best = best > len / 2 ? best - len / 2 : len / 2 - best;
        if (best == 0 || dist_i < dist_best)
            best = i;
    }
    return best;
}

/* ---------------------------------------------------------------- model file */

static void model_free(model_spec *m)
{
    free(m->name);
    free(m->toolkit_version);
    free(m->target_platform);
    free(m->hang_trigger);
    for (int i = 0; i < m->vocab_len; i++)
        free(m->vocab[i]);
    free(m->vocab);
    memset(m, 0, sizeof *m);
}

static char *read_text_file(const char *path, char *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, ERR_LEN, "cannot open model file %s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(MAX_MODEL_FILE_BYTES + 1);
    size_t len = buf ? fread(buf, 1, MAX_MODEL_FILE_BYTES + 1, f) : 0;
    fclose(f);
    if (!buf) {
        snprintf(err, ERR_LEN, "out of memory reading %s", path);
        return NULL;
    }
    if (len > MAX_MODEL_FILE_BYTES || memchr(buf, '\0', len)) {
        snprintf(err, ERR_LEN, "%s is not a %s text model file (binary or over 1 MiB)", path, MODEL_FORMAT);
        free(buf);
        return NULL;
    }
    buf[len] = '\0';
    return buf;
}

static bool parse_int(const char *s, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return false;
    *out = (int)v;
    return true;
}

static bool parse_real(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static bool parse_bool(const char *s, bool *out)
{
    if (!strcmp(s, "true") || !strcmp(s, "1")) {
        *out = true;
        return true;
    }
    if (!strcmp(s, "false") || !strcmp(s, "0")) {
        *out = false;
        return true;
    }
    return false;
}

/* Tokens are separated by '|'; "\|", "\\" and "\n" escape a bar, a backslash and a newline. */
static bool parse_vocab(model_spec *m, const char *value, char *err)
{
    char token[MAX_TOKEN_BYTES + 1];
    size_t len = 0;
    m->vocab = calloc(MAX_VOCAB, sizeof *m->vocab);
    if (!m->vocab) {
        snprintf(err, ERR_LEN, "out of memory");
        return false;
    }
    for (const char *p = value;; p++) {
        if (*p == '|' || *p == '\0') {
            if (len == 0) {
                snprintf(err, ERR_LEN, "vocab has an empty token");
                return false;
            }
            if (!utf8_valid(token, len)) {
                snprintf(err, ERR_LEN, "vocab token %d is not valid UTF-8", m->vocab_len);
                return false;
            }
            if (m->vocab_len == MAX_VOCAB) {
                snprintf(err, ERR_LEN, "vocab has more than %d tokens", MAX_VOCAB);
                return false;
            }
            token[len] = '\0';
            m->vocab[m->vocab_len++] = strdup(token);
            len = 0;
            if (*p == '\0')
                return true;
            continue;
        }
        char c = *p;
        if (c == '\\' && (p[1] == '|' || p[1] == '\\' || p[1] == 'n')) {
            p++;
            c = *p == 'n' ? '\n' : *p;
        }
        if (len == MAX_TOKEN_BYTES) {
            snprintf(err, ERR_LEN, "vocab token %d is longer than %d bytes", m->vocab_len, MAX_TOKEN_BYTES);
            return false;
        }
        token[len++] = c;
    }
}

static bool set_model_key(model_spec *m, const char *key, const char *value, bool *format_ok, char *err)
{
    bool ok;
    if (!strcmp(key, "format")) {
        ok = !strcmp(value, MODEL_FORMAT);
        *format_ok = ok;
        if (!ok) {
            snprintf(err, ERR_LEN, "wrong format line: \"format = %s\" (expected %s)", value, MODEL_FORMAT);
            return false;
        }
    } else if (!strcmp(key, "name")) {
        ok = (m->name = strdup(value)) != NULL;
    } else if (!strcmp(key, "toolkit_version")) {
        ok = (m->toolkit_version = strdup(value)) != NULL;
    } else if (!strcmp(key, "target_platform")) {
        ok = (m->target_platform = strdup(value)) != NULL;
    } else if (!strcmp(key, "max_context")) {
        ok = parse_int(value, 1, MAX_CONTEXT_LIMIT, &m->max_context);
    } else if (!strcmp(key, "memory_mb")) {
        ok = parse_real(value, 0.001, 1e6, &m->memory_mb);
    } else if (!strcmp(key, "decode_tokens_per_second")) {
        ok = parse_real(value, 0, 1e6, &m->tokens_per_second);
    } else if (!strcmp(key, "prefill_ms_per_token")) {
        ok = parse_real(value, 0, 1e5, &m->prefill_ms_per_token);
    } else if (!strcmp(key, "reply_tokens")) {
        ok = parse_int(value, 0, 1000000, &m->reply_tokens);
    } else if (!strcmp(key, "vocab")) {
        return parse_vocab(m, value, err);
    } else if (!strcmp(key, "think")) {
        ok = parse_bool(value, &m->think);
    } else if (!strcmp(key, "split_utf8_every")) {
        ok = parse_int(value, 0, 1000000, &m->split_utf8_every);
    } else if (!strcmp(key, "fragment_every")) {
        ok = parse_int(value, 0, 1000000, &m->fragment_every);
    } else if (!strcmp(key, "error_at_token")) {
        ok = parse_int(value, -1, 1000000, &m->error_at_token);
    } else if (!strcmp(key, "segv_at_token")) {
        ok = parse_int(value, -1, 1000000, &m->segv_at_token);
    } else if (!strcmp(key, "fail_init")) {
        ok = parse_bool(value, &m->fail_init);
    } else if (!strcmp(key, "slow_abort_ms")) {
        ok = parse_int(value, 0, 3600000, &m->slow_abort_ms);
    } else if (!strcmp(key, "hang_at_token")) {
        ok = parse_int(value, -1, 1000000, &m->hang_at_token);
    } else if (!strcmp(key, "hang_ignores_abort")) {
        ok = parse_bool(value, &m->hang_ignores_abort);
    } else if (!strcmp(key, "embd_size")) {
        ok = parse_int(value, 1, MAX_EMBD_SIZE, &m->embd_size);
    } else if (!strcmp(key, "hang_trigger")) {
        free(m->hang_trigger);
        ok = (m->hang_trigger = strdup(value)) != NULL;
    } else {
        snprintf(err, ERR_LEN, "unknown key \"%s\"", key);
        return false;
    }
    if (!ok)
        snprintf(err, ERR_LEN, "bad value for %s: \"%s\"", key, value);
    return ok;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t len = strlen(s);
    while (len && (s[len - 1] == ' ' || s[len - 1] == '\t' || s[len - 1] == '\r'))
        s[--len] = '\0';
    return s;
}

/* A comment runs from a '#' that starts the line or follows whitespace. */
static void strip_comment(char *s)
{
    for (char *p = s; *p; p++)
        if (*p == '#' && (p == s || p[-1] == ' ' || p[-1] == '\t')) {
            *p = '\0';
            return;
        }
}

static bool parse_model_text(model_spec *m, char *text, char *err)
{
    char line_err[ERR_LEN];
    bool format_ok = false;
    int line_no = 0;
    for (char *line = text, *next; line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        line_no++;
        strip_comment(line);
        char *content = trim(line);
        if (!*content)
            continue;
        char *eq = strchr(content, '=');
        if (!eq) {
            snprintf(err, ERR_LEN, "line %d: expected \"key = value\"", line_no);
            return false;
        }
        *eq = '\0';
        if (!set_model_key(m, trim(content), trim(eq + 1), &format_ok, line_err)) {
            snprintf(err, ERR_LEN, "line %d: %.400s", line_no, line_err);
            return false;
        }
    }
    if (!format_ok) {
        snprintf(err, ERR_LEN, "format line missing (expected \"format = %s\")", MODEL_FORMAT);
        return false;
    }
    const char *missing = !m->name              ? "name"
                          : !m->toolkit_version ? "toolkit_version"
                          : !m->max_context     ? "max_context"
                          : m->memory_mb <= 0   ? "memory_mb"
                          : !m->vocab_len       ? "vocab"
                                                : NULL;
    if (missing) {
        snprintf(err, ERR_LEN, "required key %s missing", missing);
        return false;
    }
    if (strncmp(m->toolkit_version, "1.2.", 4) != 0) {
        snprintf(err, ERR_LEN, "model was converted by rkllm-toolkit %s; runtime 1.2.3 needs a 1.2.x model",
                 m->toolkit_version);
        return false;
    }
    return true;
}

typedef enum { ENV_INT, ENV_REAL, ENV_BOOL } env_kind;

static bool env_override(const char *var, env_kind kind, double lo, double hi, void *target, char *err)
{
    const char *value = getenv(var);
    if (!value || !*value)
        return true;
    bool ok = kind == ENV_INT    ? parse_int(value, (long)lo, (long)hi, target)
              : kind == ENV_REAL ? parse_real(value, lo, hi, target)
                                 : parse_bool(value, target);
    if (!ok)
        snprintf(err, ERR_LEN, "bad value in environment: %s=%s", var, value);
    return ok;
}

static bool apply_env_overrides(model_spec *m, char *err)
{
    return env_override("RKLLM_DOUBLE_TPS", ENV_REAL, 0, 1e6, &m->tokens_per_second, err) &&
           env_override("RKLLM_DOUBLE_PREFILL_MS", ENV_REAL, 0, 1e5, &m->prefill_ms_per_token, err) &&
           env_override("RKLLM_DOUBLE_REPLY_TOKENS", ENV_INT, 0, 1000000, &m->reply_tokens, err) &&
           env_override("RKLLM_DOUBLE_ERROR_AT", ENV_INT, -1, 1000000, &m->error_at_token, err) &&
           env_override("RKLLM_DOUBLE_SEGV_AT", ENV_INT, -1, 1000000, &m->segv_at_token, err) &&
           env_override("RKLLM_DOUBLE_FAIL_INIT", ENV_BOOL, 0, 0, &m->fail_init, err) &&
           env_override("RKLLM_DOUBLE_SLOW_ABORT_MS", ENV_INT, 0, 3600000, &m->slow_abort_ms, err) &&
           env_override("RKLLM_DOUBLE_HANG_AT", ENV_INT, -1, 1000000, &m->hang_at_token, err) &&
           env_override("RKLLM_DOUBLE_HANG_IGNORES_ABORT", ENV_BOOL, 0, 0, &m->hang_ignores_abort, err);
}

static bool load_model(const char *path, model_spec *m, char *err)
{
    m->reply_tokens = 16;
    m->error_at_token = -1;
    m->segv_at_token = -1;
    m->hang_at_token = -1;
    m->embd_size = DEFAULT_EMBD_SIZE;
    char *text = read_text_file(path, err);
    if (!text)
        return false;
    char parse_err[ERR_LEN];
    bool ok = parse_model_text(m, text, parse_err);
    free(text);
    if (!ok) {
        snprintf(err, ERR_LEN, "failed to load model %.200s: %.280s", path, parse_err);
        return false;
    }
    if (!m->target_platform)
        m->target_platform = strdup("rk3588");
    /* The runtime logs the platform upper-case (RK3588) whatever the model file says. */
    for (char *c = m->target_platform; c && *c; c++)
        if (*c >= 'a' && *c <= 'z')
            *c = (char)(*c - 'a' + 'A');
    return apply_env_overrides(m, err);
}

/* ---------------------------------------------------------------- params */

static const char *call_state_name(LLMCallState state)
{
    switch (state) {
    case RKLLM_RUN_NORMAL: return "NORMAL";
    case RKLLM_RUN_WAITING: return "WAITING";
    case RKLLM_RUN_FINISH: return "FINISH";
    case RKLLM_RUN_ERROR: return "ERROR";
    }
    return "?";
}

/* Reports every out-of-range field (a ctypes struct with a misplaced field shows up here). */
static bool params_valid(const RKLLMParam *p)
{
    const RKLLMExtendParam *x = &p->extend_param;
    int bad = 0;
#define CHECK(cond, ...)                 \
    do {                                 \
        if (!(cond)) {                   \
            violation(0, __VA_ARGS__);   \
            bad++;                       \
        }                                \
    } while (0)
    CHECK(p->model_path != NULL, "rkllm_init: param.model_path is NULL");
    CHECK(p->max_context_len > 0 && p->max_context_len <= MAX_CONTEXT_LIMIT,
          "rkllm_init: param.max_context_len=%d out of range 1..%d", p->max_context_len, MAX_CONTEXT_LIMIT);
    CHECK(p->max_new_tokens > 0, "rkllm_init: param.max_new_tokens=%d must be > 0", p->max_new_tokens);
    CHECK(p->top_k >= 0 && p->top_k <= 1000, "rkllm_init: param.top_k=%d out of range 0..1000", p->top_k);
    CHECK(p->n_keep >= -1, "rkllm_init: param.n_keep=%d must be >= -1", p->n_keep);
    CHECK(isfinite(p->top_p) && p->top_p >= 0 && p->top_p <= 1, "rkllm_init: param.top_p=%g out of range [0,1]",
          (double)p->top_p);
    CHECK(isfinite(p->temperature) && p->temperature >= 0 && p->temperature <= 2,
          "rkllm_init: param.temperature=%g out of range [0,2]", (double)p->temperature);
    CHECK(isfinite(p->repeat_penalty) && p->repeat_penalty > 0 && p->repeat_penalty <= 10,
          "rkllm_init: param.repeat_penalty=%g out of range (0,10]", (double)p->repeat_penalty);
    CHECK(isfinite(p->frequency_penalty) && fabsf(p->frequency_penalty) <= 2,
          "rkllm_init: param.frequency_penalty=%g out of range [-2,2]", (double)p->frequency_penalty);
    CHECK(isfinite(p->presence_penalty) && fabsf(p->presence_penalty) <= 2,
          "rkllm_init: param.presence_penalty=%g out of range [-2,2]", (double)p->presence_penalty);
    CHECK(p->mirostat >= 0 && p->mirostat <= 2, "rkllm_init: param.mirostat=%d not 0, 1 or 2", p->mirostat);
    CHECK(isfinite(p->mirostat_tau) && isfinite(p->mirostat_eta), "rkllm_init: mirostat_tau/eta not finite");
    CHECK(p->img_start && p->img_end && p->img_content,
          "rkllm_init: img_start/img_end/img_content must be strings (\"\" for text-only models), not NULL");
    CHECK(x->base_domain_id >= 0 && x->base_domain_id < MAX_DOMAINS,
          "rkllm_init: extend_param.base_domain_id=%d out of range 0..%d", x->base_domain_id, MAX_DOMAINS - 1);
    CHECK(x->embed_flash == 0 || x->embed_flash == 1, "rkllm_init: extend_param.embed_flash=%d not 0/1",
          x->embed_flash);
    CHECK(x->enabled_cpus_mask != 0 && x->enabled_cpus_mask <= 0xFF,
          "rkllm_init: extend_param.enabled_cpus_mask=0x%x must select CPUs among CPU0..CPU7",
          (unsigned)x->enabled_cpus_mask);
    CHECK(x->enabled_cpus_mask == 0 ||
              (x->enabled_cpus_num >= 1 && x->enabled_cpus_num <= __builtin_popcount(x->enabled_cpus_mask & 0xFF)),
          "rkllm_init: extend_param.enabled_cpus_num=%d but enabled_cpus_mask=0x%x selects %d CPUs",
          x->enabled_cpus_num, (unsigned)x->enabled_cpus_mask, __builtin_popcount(x->enabled_cpus_mask & 0xFF));
    CHECK(x->n_batch == 1, "rkllm_init: extend_param.n_batch=%d; the test double supports only 1",
          x->n_batch);
#undef CHECK
    return bad == 0;
}

/* ---------------------------------------------------------------- handles */

/* Returns the handle locked, or NULL (reported) when it is not a live handle. */
static struct double_handle *lock_handle(LLMHandle handle, const char *fn)
{
    pthread_mutex_lock(&registry_lock);
    struct double_handle *h = registry;
    while (h && h != handle)
        h = h->next;
    if (h)
        pthread_mutex_lock(&h->lock);
    pthread_mutex_unlock(&registry_lock);
    if (!h)
        violation(0, "%s called with %s handle %p", fn, handle ? "an unknown or destroyed" : "a NULL", handle);
    return h;
}

/* Calls that change handle state while a run is in flight would race the runtime's own threads. */
static bool refuse_if_running(struct double_handle *h, const char *fn)
{
    if (!h->running)
        return false;
    violation(h->id, "%s called while rkllm_run is in progress on this handle", fn);
    pthread_mutex_unlock(&h->lock);
    return true;
}

/*
 * fork() while another thread holds one of our locks would leave it locked forever in the child, so
 * every lock is taken around fork (registry first, the same order as lock_handle). Registered from
 * the first rkllm_init rather than a constructor: loading the library must not do anything.
 */
static void lock_all_for_fork(void)
{
    pthread_mutex_lock(&registry_lock);
    for (struct double_handle *h = registry; h; h = h->next)
        pthread_mutex_lock(&h->lock);
}

static void unlock_all_after_fork(void)
{
    for (struct double_handle *h = registry; h; h = h->next)
        pthread_mutex_unlock(&h->lock);
    pthread_mutex_unlock(&registry_lock);
}

static void register_fork_handlers(void)
{
    pthread_atfork(lock_all_for_fork, unlock_all_after_fork, unlock_all_after_fork);
}

static void handle_free(struct double_handle *h)
{
    model_free(&h->model);
    free(h->model_path);
    free(h->tool_name);
    free(h->prompt_cache_path);
    free(h->hidden);
    for (lora_entry *l = h->loras, *next; l; l = next) {
        next = l->next;
        free(l->name);
        free(l);
    }
    pthread_cond_destroy(&h->wake);
    pthread_mutex_destroy(&h->lock);
    free(h);
}

static struct double_handle *handle_new(void)
{
    struct double_handle *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&h->wake, &attr);
    pthread_condattr_destroy(&attr);
    pthread_mutex_init(&h->lock, NULL);
    h->kv_hash = FNV_BASIS;
    return h;
}

static bool read_domain_limit(double *limit_mb, char *err)
{
    *limit_mb = DEFAULT_DOMAIN_MB;
    return env_override("RKLLM_DOUBLE_NPU_DOMAIN_MB", ENV_REAL, 1, 1e7, limit_mb, err);
}

static bool reserve_domain_memory(const model_spec *m, const char *path, int domain, char *err)
{
    double limit_mb;
    if (!read_domain_limit(&limit_mb, err))
        return false;
    pthread_mutex_lock(&registry_lock);
    bool fits = domain_used_mb[domain] + m->memory_mb <= limit_mb;
    double used = domain_used_mb[domain];
    if (fits)
        domain_used_mb[domain] += m->memory_mb;
    pthread_mutex_unlock(&registry_lock);
    if (!fits) {
        fprintf(stderr, "E RKNN: failed to malloc npu memory, size: %llu\n",
                (unsigned long long)llround(m->memory_mb * 1024 * 1024));
        snprintf(err, ERR_LEN,
                 "failed to malloc npu memory for %s: base_domain_id %d has %.0f of %.0f MB in use and the "
                 "model needs %.0f MB (load it with another base_domain_id)",
                 path, domain, used, limit_mb, m->memory_mb);
    }
    return fits;
}

static void release_domain_memory(int domain, double mb)
{
    pthread_mutex_lock(&registry_lock);
    domain_used_mb[domain] -= mb;
    if (domain_used_mb[domain] < 0.5)
        domain_used_mb[domain] = 0;
    pthread_mutex_unlock(&registry_lock);
}

static void print_enabled_cpus(unsigned mask)
{
    fprintf(stderr, "I rkllm: Enabled cpus: [");
    const char *sep = "";
    for (int cpu = 0; cpu < 8; cpu++)
        if (mask & (1u << cpu)) {
            fprintf(stderr, "%s%d", sep, cpu);
            sep = ", ";
        }
    fprintf(stderr, "]\n");
}

static void log_init(const struct double_handle *h)
{
    const RKLLMParam *p = &h->params;
    const RKLLMExtendParam *x = &p->extend_param;
    log_event("INIT", h->id,
              "model=%s name=%s max_context_len=%d max_new_tokens=%d top_k=%d n_keep=%d top_p=%g temperature=%g "
              "repeat_penalty=%g frequency_penalty=%g presence_penalty=%g mirostat=%d skip_special_token=%d "
              "is_async=%d base_domain_id=%d embed_flash=%d enabled_cpus_num=%d enabled_cpus_mask=0x%x "
              "n_batch=%d use_cross_attn=%d memory_mb=%g",
              h->model_path, h->model.name, p->max_context_len, p->max_new_tokens, p->top_k, p->n_keep,
              (double)p->top_p, (double)p->temperature, (double)p->repeat_penalty, (double)p->frequency_penalty,
              (double)p->presence_penalty, p->mirostat, p->skip_special_token, p->is_async, x->base_domain_id,
              x->embed_flash, x->enabled_cpus_num, (unsigned)x->enabled_cpus_mask, x->n_batch,
              x->use_cross_attn, h->model.memory_mb);
}

static int init_failed(const char *path, const char *reason)
{
    fprintf(stderr, "E rkllm: %s\n", reason);
    log_event("INIT_FAILED", 0, "model=%s reason=%s", path ? path : "(null)", reason);
    return -1;
}

EXPORT RKLLMParam rkllm_createDefaultParam(void)
{
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.max_context_len = 512;
    p.max_new_tokens = 512;
    p.top_k = 40;
    p.n_keep = -1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    p.img_start = "";
    p.img_end = "";
    p.img_content = "";
    p.extend_param.enabled_cpus_num = 4;
    p.extend_param.enabled_cpus_mask = CPU4 | CPU5 | CPU6 | CPU7;
    p.extend_param.n_batch = 1;
    return p;
}

EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback)
{
    if (!handle) {
        violation(0, "rkllm_init called with a NULL handle pointer");
        return -1;
    }
    *handle = NULL;
    if (!param || !callback) {
        violation(0, "rkllm_init called with a NULL %s", param ? "callback" : "param");
        return -1;
    }
    pthread_once(&fork_handlers_once, register_fork_handlers);
    fprintf(stderr, "I rkllm: rkllm-runtime version: 1.2.3 (test double), rknpu driver version: 0.9.8, "
                    "platform: RK3588\n");
    if (!params_valid(param))
        return init_failed(param->model_path, "invalid RKLLMParam (each bad field is reported above)");

    char err[ERR_LEN];
    model_spec model = {0};
    if (!load_model(param->model_path, &model, err)) {
        model_free(&model);
        return init_failed(param->model_path, err);
    }
    if (model.fail_init) {
        snprintf(err, ERR_LEN, "failed to load model %s: fail_init fault injected (test double)",
                 param->model_path);
        model_free(&model);
        return init_failed(param->model_path, err);
    }
    fprintf(stderr,
            "I rkllm: rkllm-toolkit version: %s, max_context_limit: %d, npu_core_num: 3, target_platform: %s, "
            "model_dtype: W8A8\n",
            model.toolkit_version, model.max_context, model.target_platform);
    int max_context = param->max_context_len;
    if (max_context > model.max_context) {
        fprintf(stderr, "W rkllm: max_context_len %d exceeds the model's max_context_limit %d; using %d\n",
                max_context, model.max_context, model.max_context);
        max_context = model.max_context;
    }
    print_enabled_cpus(param->extend_param.enabled_cpus_mask);

    int domain = param->extend_param.base_domain_id;
    if (!reserve_domain_memory(&model, param->model_path, domain, err)) {
        model_free(&model);
        return init_failed(param->model_path, err);
    }
    struct double_handle *h = handle_new();
    char *path_copy = strdup(param->model_path);
    if (!h || !path_copy) {
        free(h);
        free(path_copy);
        release_domain_memory(domain, model.memory_mb);
        model_free(&model);
        return init_failed(param->model_path, "out of memory");
    }
    h->model = model;
    h->model_path = path_copy;
    h->params = *param;
    h->params.model_path = h->model_path;
    h->params.img_start = h->params.img_end = h->params.img_content = "";
    h->max_context = max_context;
    h->callback = callback;
    pthread_mutex_lock(&registry_lock);
    h->id = next_handle_id++;
    h->next = registry;
    registry = h;
    pthread_mutex_unlock(&registry_lock);
    log_init(h);
    *handle = h;
    return 0;
}

EXPORT int rkllm_destroy(LLMHandle handle)
{
    pthread_mutex_lock(&registry_lock);
    struct double_handle **link = &registry;
    while (*link && *link != handle)
        link = &(*link)->next;
    struct double_handle *h = *link;
    if (!h) {
        pthread_mutex_unlock(&registry_lock);
        violation(0, "rkllm_destroy called with %s handle %p", handle ? "an unknown or destroyed" : "a NULL",
                  handle);
        return -1;
    }
    pthread_mutex_lock(&h->lock);
    if (h->running && pthread_equal(h->run_thread, pthread_self())) {
        pthread_mutex_unlock(&h->lock);
        pthread_mutex_unlock(&registry_lock);
        violation(h->id, "rkllm_destroy called from inside the result callback");
        return -1;
    }
    *link = h->next;
    pthread_mutex_unlock(&registry_lock);
    if (h->running) {
        violation(h->id, "rkllm_destroy while rkllm_run is in progress (the real runtime fails with 'failed to "
                         "submit'); aborting the run and waiting for it");
        h->abort_requested = true;
        h->abort_effective = now_mono();
        pthread_cond_broadcast(&h->wake);
        while (h->running)
            pthread_cond_wait(&h->wake, &h->lock);
    }
    pthread_mutex_unlock(&h->lock);
    release_domain_memory(h->params.extend_param.base_domain_id, h->model.memory_mb);
    log_event("DESTROY", h->id, "model=%s", h->model_path);
    handle_free(h);
    return 0;
}

EXPORT int rkllm_abort(LLMHandle handle)
{
    struct double_handle *h = lock_handle(handle, "rkllm_abort");
    if (!h)
        return -1;
    if (h->running && !h->abort_requested) {
        h->abort_requested = true;
        h->abort_effective = ts_add_ms(now_mono(), h->model.slow_abort_ms);
        pthread_cond_broadcast(&h->wake);
        log_event("ABORT", h->id, "slow_abort_ms=%d", h->model.slow_abort_ms);
    }
    pthread_mutex_unlock(&h->lock);
    return 0;
}

EXPORT int rkllm_is_running(LLMHandle handle)
{
    struct double_handle *h = lock_handle(handle, "rkllm_is_running");
    if (!h)
        return -1;
    int result = h->running ? 0 : 1;
    pthread_mutex_unlock(&h->lock);
    return result;
}

/* ---------------------------------------------------------------- run */

enum { TOKEN_THINK_OPEN, TOKEN_THINK_CLOSE, TOKEN_TOOL_FIRST };
static const char THINK_OPEN[] = "<think>\n";
static const char THINK_CLOSE[] = "\n</think>\n\n";

typedef struct {
    char *text;
    uint32_t seed;
    const char *input_kind;
    const char *role;
    int keep_history;
    bool hidden_layer; /* RKLLM_INFER_GET_LAST_HIDDEN_LAYER: prefill only, hidden states, no tokens */
    int prompt_tokens;
    int prefill_tokens;
    int kv_before;
    uint32_t kv_hash_before;
    int kv_start;
    int reply_len;
    bool tool_call;
    char *lora;
    char *save_cache_path;
} run_plan;

typedef struct {
    struct double_handle *h;
    LLMResultCallback callback;
    void *userdata;
    int multibyte_tokens;
} run_ctx;

static char *text_from_token_ids(const model_spec *m, const RKLLMTokenInput *in, unsigned id)
{
    size_t cap = 1;
    for (size_t i = 0; i < in->n_tokens; i++) {
        if (in->input_ids[i] < 0) {
            violation(id, "rkllm_run: token_input.input_ids[%zu]=%d is negative", i, in->input_ids[i]);
            return NULL;
        }
        cap += strlen(m->vocab[in->input_ids[i] % m->vocab_len]);
    }
    char *text = malloc(cap);
    if (!text)
        return NULL;
    char *end = text;
    for (size_t i = 0; i < in->n_tokens; i++)
        end = stpcpy(end, m->vocab[in->input_ids[i] % m->vocab_len]);
    return text;
}

static bool lora_loaded(const struct double_handle *h, const char *name)
{
    for (const lora_entry *l = h->loras; l; l = l->next)
        if (!strcmp(l->name, name))
            return true;
    return false;
}

/* Validates a run request and works out its token accounting; called with h->lock held. */
static bool plan_run(struct double_handle *h, const RKLLMInput *in, const RKLLMInferParam *infer, run_plan *plan)
{
    memset(plan, 0, sizeof *plan);
    if (!in || !infer) {
        violation(h->id, "rkllm_run called with a NULL %s", in ? "infer param" : "input");
        return false;
    }
    if (!in->role || (strcmp(in->role, "user") && strcmp(in->role, "tool"))) {
        violation(h->id, "rkllm_run: input.role must be \"user\" or \"tool\", got %s%s%s", in->role ? "\"" : "",
                  in->role ? in->role : "NULL", in->role ? "\"" : "");
        return false;
    }
    if (infer->mode != RKLLM_INFER_GENERATE && infer->mode != RKLLM_INFER_GET_LAST_HIDDEN_LAYER) {
        fprintf(stderr, "E rkllm-double: infer mode %d is not supported by the test double\n", infer->mode);
        return false;
    }
    const RKLLMLoraParam *lora = infer->lora_params;
    if (lora && (!lora->lora_adapter_name || !lora_loaded(h, lora->lora_adapter_name))) {
        fprintf(stderr, "E rkllm: lora adapter %s has not been loaded\n",
                lora->lora_adapter_name ? lora->lora_adapter_name : "(null)");
        return false;
    }
    /* The plan owns everything it keeps: an async run outlives the caller's input structs. */
    plan->lora = lora ? strdup(lora->lora_adapter_name) : NULL;
    plan->role = strcmp(in->role, "tool") ? "user" : "tool";
    plan->keep_history = infer->keep_history != 0;
    plan->hidden_layer = infer->mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER;
    if (in->input_type == RKLLM_INPUT_PROMPT) {
        if (!in->prompt_input) {
            violation(h->id, "rkllm_run: prompt_input is NULL");
            return false;
        }
        plan->input_kind = "PROMPT";
        plan->text = strdup(in->prompt_input);
        plan->prompt_tokens = token_count(in->prompt_input);
    } else if (in->input_type == RKLLM_INPUT_TOKEN) {
        if (!in->token_input.input_ids || in->token_input.n_tokens == 0 ||
            in->token_input.n_tokens > MAX_CONTEXT_LIMIT) {
            violation(h->id, "rkllm_run: token_input needs 1..%d ids (got %zu, ids %s)", MAX_CONTEXT_LIMIT,
                      in->token_input.n_tokens, in->token_input.input_ids ? "set" : "NULL");
            return false;
        }
        plan->input_kind = "TOKEN";
        plan->text = text_from_token_ids(&h->model, &in->token_input, h->id);
        plan->prompt_tokens = (int)in->token_input.n_tokens;
    } else {
        fprintf(stderr, "E rkllm-double: input_type %d is not supported by the test double\n", in->input_type);
        return false;
    }
    if (!plan->text)
        return false;
    const RKLLMPromptCacheParam *cache = infer->prompt_cache_params;
    if (cache && cache->save_prompt_cache) {
        plan->save_cache_path = strdup(cache->prompt_cache_path ? cache->prompt_cache_path : "./prompt_cache.bin");
    }
    /* The reply continues everything in the cache: the same text reached by prefilling it whole or turn by
     * turn gives the same reply. */
    plan->seed = fnv1a_continue(plan->keep_history ? h->kv_hash : FNV_BASIS, plan->text);
    plan->kv_before = h->kv_len;
    plan->kv_hash_before = h->kv_hash;
    plan->kv_start = plan->keep_history ? h->kv_len : 0;
    plan->prefill_tokens = plan->prompt_tokens + (plan->kv_start == 0 ? h->system_tokens : 0);
    plan->tool_call = h->tool_name && strcmp(in->role, "tool") && strstr(plan->text, "weather");
    if (lora && !plan->lora)
        return false;
    plan->reply_len = plan->tool_call ? 5 : h->model.reply_tokens;
    return true;
}

static void plan_free(run_plan *plan)
{
    free(plan->text);
    free(plan->lora);
    free(plan->save_cache_path);
}

/* Sleeps to an absolute deadline; returns true as soon as an abort takes effect. */
static bool wait_until(struct double_handle *h, struct timespec deadline)
{
    pthread_mutex_lock(&h->lock);
    bool aborted = false;
    for (;;) {
        struct timespec now = now_mono();
        if (h->abort_requested && ts_cmp(now, h->abort_effective) >= 0) {
            aborted = true;
            break;
        }
        if (ts_cmp(now, deadline) >= 0)
            break;
        struct timespec until = deadline;
        if (h->abort_requested && ts_cmp(h->abort_effective, until) < 0)
            until = h->abort_effective;
        pthread_cond_timedwait(&h->wake, &h->lock, &until);
    }
    pthread_mutex_unlock(&h->lock);
    return aborted;
}

/*
 * A stuck NPU job: no callback, rkllm_run blocks. Returns once rkllm_abort takes effect (false when the
 * model ignores abort: then only the end of the process ends the run, as with a wedged driver).
 */
static void hang(struct double_handle *h, int token)
{
    bool ignores = h->model.hang_ignores_abort;
    fprintf(stderr, "E rkllm-double: hang fault at token %d (abort %s)\n", token, ignores ? "ignored" : "releases it");
    log_event("HANG", h->id, "token=%d abort=%s", token, ignores ? "ignored" : "releases");
    pthread_mutex_lock(&h->lock);
    for (;;) {
        if (!ignores && h->abort_requested && ts_cmp(now_mono(), h->abort_effective) >= 0)
            break;
        if (!ignores && h->abort_requested)
            pthread_cond_timedwait(&h->wake, &h->lock, &h->abort_effective);
        else
            pthread_cond_wait(&h->wake, &h->lock);
    }
    pthread_mutex_unlock(&h->lock);
}

static bool hang_applies(const model_spec *m, const run_plan *plan, int generated)
{
    return generated == m->hang_at_token && (!m->hang_trigger || strstr(plan->text, m->hang_trigger));
}

/* Returns true when the callback asked to pause (returned 1). */
static bool invoke(run_ctx *ctx, RKLLMResult *result, LLMCallState state)
{
    int verdict = ctx->callback(result, ctx->userdata, state);
    if (verdict != 0 && verdict != 1)
        violation(ctx->h->id, "callback returned %d for state %s; 1.2.3 defines only 0 (continue) and 1 (pause)",
                  verdict, call_state_name(state));
    return verdict == 1;
}

static bool emit_piece(run_ctx *ctx, const char *text, size_t len, int32_t token_id, LLMCallState state)
{
    char buf[MAX_TOKEN_BYTES + 1];
    memcpy(buf, text, len);
    buf[len] = '\0';
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    result.text = buf;
    result.token_id = token_id;
    return invoke(ctx, &result, state);
}

static const char *reply_token(const struct double_handle *h, const run_plan *plan, int i, int32_t *token_id)
{
    const model_spec *m = &h->model;
    if (plan->tool_call) {
        static const char *const pieces[] = {"<tool_call>", "{\"name\": \"", NULL,
                                             "\", \"arguments\": {\"location\": \"Paris\"}}", "</tool_call>"};
        *token_id = m->vocab_len + TOKEN_TOOL_FIRST + i;
        return pieces[i] ? pieces[i] : h->tool_name;
    }
    if (m->think) {
        int think_words = (plan->reply_len - 2) / 3;
        if (i == 0 || i == think_words + 1) {
            *token_id = m->vocab_len + (i == 0 ? TOKEN_THINK_OPEN : TOKEN_THINK_CLOSE);
            return i == 0 ? THINK_OPEN : THINK_CLOSE;
        }
    }
    *token_id = (int32_t)((plan->seed + (uint64_t)i * 7) % (uint64_t)m->vocab_len);
    return m->vocab[*token_id];
}

/* Delivers token i, split into WAITING+NORMAL or two NORMAL pieces when the model asks for it; the token
 * joins the cache's history. */
static bool deliver_token(run_ctx *ctx, const run_plan *plan, int i, uint32_t *kv_hash)
{
    const model_spec *m = &ctx->h->model;
    int32_t token_id;
    const char *text = reply_token(ctx->h, plan, i, &token_id);
    *kv_hash = fnv1a_continue(*kv_hash, text);
    size_t len = strlen(text);
    int lead = first_multibyte_lead(text);
    if (lead >= 0)
        ctx->multibyte_tokens++;
    size_t cut = 0;
    LLMCallState first_state = RKLLM_RUN_NORMAL;
    if (lead >= 0 && m->split_utf8_every > 0 && ctx->multibyte_tokens % m->split_utf8_every == 0) {
        cut = (size_t)lead + 1;
        first_state = RKLLM_RUN_WAITING;
    } else if (m->fragment_every > 0 && (i + 1) % m->fragment_every == 0) {
        cut = middle_char_boundary(text, len);
    }
    if (cut == 0)
        return emit_piece(ctx, text, len, token_id, RKLLM_RUN_NORMAL);
    if (emit_piece(ctx, text, cut, token_id, first_state))
        return true;
    return emit_piece(ctx, text + cut, len - cut, token_id, RKLLM_RUN_NORMAL);
}

static void save_prompt_cache(const struct double_handle *h, const run_plan *plan)
{
    FILE *f = fopen(plan->save_cache_path, "w");
    if (!f || fprintf(f, "%s\nmodel=%s\ntokens=%d\n", PROMPT_CACHE_MAGIC, h->model.name, plan->prefill_tokens) < 0) {
        fprintf(stderr, "W rkllm: failed to save prompt cache %s: %s\n", plan->save_cache_path, strerror(errno));
    }
    if (f)
        fclose(f);
}

/*
 * Hidden states (documented in README.md, "Hidden-layer mode"): the prompt's bytes are cut into tokens of
 * 4 bytes (one empty token for an empty prompt); a word is a run of bytes other than space, tab, CR, LF and
 * belongs to the token holding its first byte. Row i = the sum of the features of every word in tokens
 * 0..i (causal, like a decoder's last layer) + 0.25 x the feature of token i's own bytes. feature(bytes)[d]
 * for d = 0..embd_size-1: state = FNV-1a(bytes); state = state * 1664525 + 1013904223 (mod 2^32);
 * value = (state >> 8) / 2^23 - 1. Texts sharing words therefore get similar vectors.
 */
static uint32_t fnv1a_bytes(const char *bytes, size_t len)
{
    uint32_t hash = FNV_BASIS;
    for (size_t i = 0; i < len; i++) {
        hash ^= (unsigned char)bytes[i];
        hash *= 16777619u;
    }
    return hash;
}

static void add_feature(double *acc, int embd_size, const char *bytes, size_t len, double weight)
{
    uint32_t state = fnv1a_bytes(bytes, len);
    for (int d = 0; d < embd_size; d++) {
        state = state * 1664525u + 1013904223u;
        acc[d] += weight * ((double)(state >> 8) / 8388608.0 - 1.0);
    }
}

static bool is_word_separator(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Fills h->hidden with prompt_tokens x embd_size floats; false when out of memory. */
static bool compute_hidden_states(struct double_handle *h, const run_plan *plan)
{
    const int embd = h->model.embd_size;
    const size_t len = strlen(plan->text);
    const int tokens = plan->prompt_tokens;
    size_t floats = (size_t)tokens * (size_t)embd;
    if (floats > h->hidden_floats) {
        float *grown = realloc(h->hidden, floats * sizeof *grown);
        if (!grown)
            return false;
        h->hidden = grown;
        h->hidden_floats = floats;
    }
    double *words = calloc((size_t)embd, sizeof *words);
    double *row = malloc((size_t)embd * sizeof *row);
    if (!words || !row) {
        free(words);
        free(row);
        return false;
    }
    size_t pos = 0;
    for (int i = 0; i < tokens; i++) {
        size_t chunk_end = (size_t)(i + 1) * 4 < len ? (size_t)(i + 1) * 4 : len;
        for (; pos < chunk_end; pos++) {
            if (is_word_separator(plan->text[pos]) || (pos > 0 && !is_word_separator(plan->text[pos - 1])))
                continue;
            size_t end = pos;
            while (end < len && !is_word_separator(plan->text[end]))
                end++;
            add_feature(words, embd, plan->text + pos, end - pos, 1.0);
        }
        memcpy(row, words, (size_t)embd * sizeof *row);
        size_t chunk_start = (size_t)i * 4 < len ? (size_t)i * 4 : len;
        add_feature(row, embd, plan->text + chunk_start, chunk_end - chunk_start, 0.25);
        for (int d = 0; d < embd; d++)
            h->hidden[(size_t)i * (size_t)embd + (size_t)d] = (float)row[d];
    }
    free(words);
    free(row);
    return true;
}

/* One NORMAL callback carrying the hidden states (as the 1.2.3 llm_demo reads them); true if it paused. */
static bool deliver_hidden_layer(run_ctx *ctx, const run_plan *plan)
{
    struct double_handle *h = ctx->h;
    if (!compute_hidden_states(h, plan)) {
        fprintf(stderr, "E rkllm-double: out of memory for %d x %d hidden states\n", plan->prompt_tokens,
                h->model.embd_size);
        return true;
    }
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    result.text = "";
    result.token_id = -1;
    result.last_hidden_layer.hidden_states = h->hidden;
    result.last_hidden_layer.embd_size = h->model.embd_size;
    result.last_hidden_layer.num_tokens = plan->prompt_tokens;
    bool paused = invoke(ctx, &result, RKLLM_RUN_NORMAL);
    /* All bits set is a NaN: whoever reads the buffer after the callback gets no usable number. */
    memset(h->hidden, 0xFF, (size_t)plan->prompt_tokens * (size_t)h->model.embd_size * sizeof *h->hidden);
    return paused;
}

static void run_error(run_ctx *ctx)
{
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    result.token_id = -1;
    invoke(ctx, &result, RKLLM_RUN_ERROR);
}

/* The last touch of h by the run: destroy may free it right after. */
static void end_run(struct double_handle *h, int kv_len, uint32_t kv_hash)
{
    pthread_mutex_lock(&h->lock);
    h->kv_len = kv_len;
    h->kv_hash = kv_hash;
    h->running = false;
    h->abort_requested = false;
    pthread_cond_broadcast(&h->wake);
    pthread_mutex_unlock(&h->lock);
}

static int execute_run(run_ctx *ctx, const run_plan *plan)
{
    struct double_handle *h = ctx->h;
    const model_spec *m = &h->model;
    log_event("RUN", h->id,
              "mode=%s input_type=%s role=%s keep_history=%d prompt_tokens=%d prefill_tokens=%d kv_before=%d lora=%s "
              "save_prompt_cache=%s tool_call=%d",
              plan->hidden_layer ? "last_hidden_layer" : "generate", plan->input_kind, plan->role,
              plan->keep_history, plan->prompt_tokens, plan->prefill_tokens,
              plan->kv_before, plan->lora ? plan->lora : "-", plan->save_cache_path ? plan->save_cache_path : "-",
              plan->tool_call);
    if (plan->kv_start + plan->prefill_tokens > h->max_context) {
        fprintf(stderr, "E rkllm: the input needs %d tokens but the KV cache holds %d of max_context_len %d\n",
                plan->prefill_tokens, plan->kv_start, h->max_context);
        log_event("ERROR", h->id, "reason=context_overflow kv=%d prefill_tokens=%d max_context_len=%d",
                  plan->kv_start, plan->prefill_tokens, h->max_context);
        run_error(ctx);
        end_run(h, plan->kv_before, plan->kv_hash_before);
        return -1;
    }
    struct timespec start = now_mono();
    struct timespec decode_base = ts_add_ms(start, plan->prefill_tokens * m->prefill_ms_per_token);
    bool aborted = wait_until(h, decode_base);
    struct timespec prefill_end = now_mono();
    if (!aborted && plan->save_cache_path)
        save_prompt_cache(h, plan);

    double interval_ms = m->tokens_per_second > 0 ? 1000.0 / m->tokens_per_second : 0;
    struct timespec due = decode_base;
    int kv = plan->kv_start + plan->prefill_tokens;
    uint32_t kv_hash = plan->seed;
    int generated = 0;
    const char *reason = aborted ? "abort" : NULL;
    if (!reason && plan->hidden_layer) {
        reason = deliver_hidden_layer(ctx, plan) ? "callback" : "stop";
    }
    while (!reason) {
        if (generated >= plan->reply_len)
            reason = "stop";
        else if (generated >= h->params.max_new_tokens || kv >= h->max_context)
            reason = "length";
        if (reason) {
            /* The step that would produce the next token (EOS) still costs one decode interval. */
            wait_until(h, due);
            break;
        }
        if (wait_until(h, due)) {
            reason = "abort";
            break;
        }
        if (generated == m->segv_at_token) {
            fprintf(stderr, "E rkllm-double: segv_at_token fault at token %d\n", generated);
            raise(SIGSEGV);
        }
        if (hang_applies(m, plan, generated)) {
            hang(h, generated);
            reason = "abort";
            break;
        }
        if (generated == m->error_at_token) {
            fprintf(stderr, "E rkllm: inference failed at token %d (error_at_token fault)\n", generated);
            log_event("ERROR", h->id, "reason=error_at_token token=%d", generated);
            run_error(ctx);
            end_run(h, plan->kv_before, plan->kv_hash_before);
            return -1;
        }
        bool paused = deliver_token(ctx, plan, generated, &kv_hash);
        generated++;
        kv++;
        if (paused)
            reason = "callback";
        /*
         * Absolute deadlines absorb callback overhead; but after a stall (this thread descheduled for
         * more than a token) a real NPU does not catch up, so neither do we: no burst of late tokens.
         */
        due = ts_add_ms(due, interval_ms);
        struct timespec now = now_mono();
        if (ts_cmp(now, ts_add_ms(due, interval_ms)) > 0)
            due = now;
    }
    if (!strcmp(reason, "callback")) {
        /* A client that pauses and aborts at once (stop flag, then rkllm_abort) ran into an abort. */
        pthread_mutex_lock(&h->lock);
        if (h->abort_requested)
            reason = "abort";
        pthread_mutex_unlock(&h->lock);
    }
    struct timespec end = now_mono();
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    result.token_id = -1;
    result.perf.prefill_time_ms = (float)ms_between(start, prefill_end);
    result.perf.prefill_tokens = plan->prefill_tokens;
    result.perf.generate_time_ms = (float)ms_between(prefill_end, end);
    result.perf.generate_tokens = generated;
    result.perf.memory_usage_mb = (float)m->memory_mb;
    log_event("FINISH", h->id, "reason=%s generated=%d kv=%d prefill_ms=%.1f generate_ms=%.1f", reason, generated,
              kv, (double)result.perf.prefill_time_ms, (double)result.perf.generate_time_ms);
    invoke(ctx, &result, RKLLM_RUN_FINISH);
    end_run(h, kv, kv_hash);
    return 0;
}

typedef struct {
    run_ctx ctx;
    run_plan plan;
} run_job;

/* Validates a run and marks the handle busy; false (already reported) when refused. */
static bool claim_run(LLMHandle handle, const char *fn, const RKLLMInput *in, const RKLLMInferParam *infer,
                      void *userdata, run_job *job)
{
    struct double_handle *h = lock_handle(handle, fn);
    if (!h)
        return false;
    bool ok = false;
    if (h->running) {
        violation(h->id, "concurrent %s on one handle: a run is already in progress; refusing this call", fn);
    } else if (plan_run(h, in, infer, &job->plan)) {
        h->running = true;
        h->run_thread = pthread_self();
        h->abort_requested = false;
        job->ctx = (run_ctx){.h = h, .callback = h->callback, .userdata = userdata, .multibyte_tokens = 0};
        ok = true;
    } else {
        plan_free(&job->plan);
    }
    pthread_mutex_unlock(&h->lock);
    return ok;
}

EXPORT int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params, void *userdata)
{
    run_job job;
    if (!claim_run(handle, "rkllm_run", rkllm_input, rkllm_infer_params, userdata, &job))
        return -1;
    int rc = execute_run(&job.ctx, &job.plan);
    plan_free(&job.plan);
    return rc;
}

static void *async_run_thread(void *arg)
{
    run_job *job = arg;
    pthread_mutex_lock(&job->ctx.h->lock);
    job->ctx.h->run_thread = pthread_self();
    pthread_mutex_unlock(&job->ctx.h->lock);
    execute_run(&job->ctx, &job->plan);
    plan_free(&job->plan);
    free(job);
    return NULL;
}

/* Returns once the run has started; callbacks then arrive on the library's own thread. */
EXPORT int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                           void *userdata)
{
    struct double_handle *h = lock_handle(handle, "rkllm_run_async");
    if (!h)
        return -1;
    bool is_async = h->params.is_async;
    unsigned id = h->id;
    pthread_mutex_unlock(&h->lock);
    if (!is_async) {
        violation(id, "rkllm_run_async on a handle initialised with param.is_async = false");
        return -1;
    }
    run_job *job = malloc(sizeof *job);
    if (!job || !claim_run(handle, "rkllm_run_async", rkllm_input, rkllm_infer_params, userdata, job)) {
        free(job);
        return -1;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    int err = pthread_create(&thread, &attr, async_run_thread, job);
    pthread_attr_destroy(&attr);
    if (err) {
        fprintf(stderr, "E rkllm: cannot start the inference thread: %s\n", strerror(err));
        end_run(job->ctx.h, job->plan.kv_before, job->plan.kv_hash_before);
        plan_free(&job->plan);
        free(job);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- state setters */

EXPORT int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter)
{
    struct double_handle *h = lock_handle(handle, "rkllm_load_lora");
    if (!h)
        return -1;
    if (refuse_if_running(h, "rkllm_load_lora"))
        return -1;
    int rc = -1;
    if (!lora_adapter || !lora_adapter->lora_adapter_path || !lora_adapter->lora_adapter_name ||
        !isfinite(lora_adapter->scale)) {
        violation(h->id, "rkllm_load_lora: adapter, its path and name must be set and scale finite");
    } else if (access(lora_adapter->lora_adapter_path, R_OK) != 0) {
        fprintf(stderr, "E rkllm: cannot open lora adapter %s: %s\n", lora_adapter->lora_adapter_path,
                strerror(errno));
    } else if (lora_loaded(h, lora_adapter->lora_adapter_name)) {
        fprintf(stderr, "E rkllm: lora adapter %s is already loaded\n", lora_adapter->lora_adapter_name);
    } else {
        lora_entry *entry = malloc(sizeof *entry);
        if (entry && (entry->name = strdup(lora_adapter->lora_adapter_name))) {
            entry->next = h->loras;
            h->loras = entry;
            log_event("LORA", h->id, "name=%s path=%s scale=%g", entry->name, lora_adapter->lora_adapter_path,
                      (double)lora_adapter->scale);
            rc = 0;
        } else {
            free(entry);
        }
    }
    pthread_mutex_unlock(&h->lock);
    return rc;
}

static bool prompt_cache_file_valid(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "E rkllm: cannot open prompt cache %s: %s\n", path, strerror(errno));
        return false;
    }
    char first[64] = "";
    bool ok = fgets(first, sizeof first, f) && !strncmp(first, PROMPT_CACHE_MAGIC, strlen(PROMPT_CACHE_MAGIC));
    fclose(f);
    if (!ok)
        fprintf(stderr, "E rkllm: %s is not a prompt cache file\n", path);
    return ok;
}

EXPORT int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path)
{
    struct double_handle *h = lock_handle(handle, "rkllm_load_prompt_cache");
    if (!h)
        return -1;
    if (refuse_if_running(h, "rkllm_load_prompt_cache"))
        return -1;
    int rc = -1;
    if (!prompt_cache_path) {
        violation(h->id, "rkllm_load_prompt_cache: path is NULL");
    } else if (prompt_cache_file_valid(prompt_cache_path)) {
        free(h->prompt_cache_path);
        h->prompt_cache_path = strdup(prompt_cache_path);
        log_event("PROMPT_CACHE", h->id, "load=%s", prompt_cache_path);
        rc = h->prompt_cache_path ? 0 : -1;
    }
    pthread_mutex_unlock(&h->lock);
    return rc;
}

EXPORT int rkllm_release_prompt_cache(LLMHandle handle)
{
    struct double_handle *h = lock_handle(handle, "rkllm_release_prompt_cache");
    if (!h)
        return -1;
    if (refuse_if_running(h, "rkllm_release_prompt_cache"))
        return -1;
    log_event("PROMPT_CACHE", h->id, "release=%s", h->prompt_cache_path ? h->prompt_cache_path : "-");
    free(h->prompt_cache_path);
    h->prompt_cache_path = NULL;
    pthread_mutex_unlock(&h->lock);
    return 0;
}

#ifndef RKLLM_DOUBLE_LEGACY_114

EXPORT int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos)
{
    struct double_handle *h = lock_handle(handle, "rkllm_clear_kv_cache");
    if (!h)
        return -1;
    if (refuse_if_running(h, "rkllm_clear_kv_cache"))
        return -1;
    int rc = 0;
    if (!start_pos && !end_pos) {
        int keep = keep_system_prompt ? h->system_tokens : 0;
        h->kv_len = h->kv_len < keep ? h->kv_len : keep;
        h->kv_hash = FNV_BASIS;
    } else if (!start_pos || !end_pos) {
        violation(h->id, "rkllm_clear_kv_cache: start_pos and end_pos must both be NULL or both be arrays");
        rc = -1;
    } else if (*start_pos < 0 || *start_pos > *end_pos || *end_pos > h->kv_len) {
        violation(h->id, "rkllm_clear_kv_cache: range [%d,%d) outside the KV cache of %d positions", *start_pos,
                  *end_pos, h->kv_len);
        rc = -1;
    } else {
        h->kv_len -= *end_pos - *start_pos;
    }
    if (rc == 0)
        log_event("CLEAR_KV", h->id, "keep_system_prompt=%d ranged=%d kv=%d", keep_system_prompt,
                  start_pos != NULL, h->kv_len);
    pthread_mutex_unlock(&h->lock);
    return rc;
}

EXPORT int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes)
{
    struct double_handle *h = lock_handle(handle, "rkllm_get_kv_cache_size");
    if (!h)
        return -1;
    int rc = 0;
    if (cache_sizes)
        cache_sizes[0] = h->kv_len;
    else {
        violation(h->id, "rkllm_get_kv_cache_size: cache_sizes is NULL (needs n_batch ints)");
        rc = -1;
    }
    pthread_mutex_unlock(&h->lock);
    return rc;
}

EXPORT int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                                   const char *prompt_postfix)
{
    struct double_handle *h = lock_handle(handle, "rkllm_set_chat_template");
    if (!h)
        return -1;
    if (refuse_if_running(h, "rkllm_set_chat_template"))
        return -1;
    int rc = -1;
    if (!system_prompt || !prompt_prefix || !prompt_postfix) {
        violation(h->id, "rkllm_set_chat_template: system_prompt, prompt_prefix and prompt_postfix must be "
                         "strings, not NULL");
    } else {
        h->system_tokens = *system_prompt ? token_count(system_prompt) : 0;
        fprintf(stderr, "I rkllm: system_prompt: %s\nI rkllm: prompt_prefix: %s\nI rkllm: prompt_postfix: %s\n",
                system_prompt, prompt_prefix, prompt_postfix);
        log_event("CHAT_TEMPLATE", h->id, "system_tokens=%d", h->system_tokens);
        rc = 0;
    }
    pthread_mutex_unlock(&h->lock);
    return rc;
}

/* The first "name" string in an OpenAI-style tools array, or NULL. */
static char *first_function_name(const char *tools)
{
    for (const char *p = strstr(tools, "\"name\""); p; p = strstr(p + 1, "\"name\"")) {
        const char *q = p + 6;
        while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')
            q++;
        if (*q++ != ':')
            continue;
        while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')
            q++;
        if (*q++ != '"')
            continue;
        size_t len = strcspn(q, "\"\\");
        if (q[len] != '"' || len == 0 || len > MAX_TOOL_NAME_BYTES)
            return NULL;
        return strndup(q, len);
    }
    return NULL;
}

EXPORT int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                    const char *tool_response_str)
{
    struct double_handle *h = lock_handle(handle, "rkllm_set_function_tools");
    if (!h)
        return -1;
    if (refuse_if_running(h, "rkllm_set_function_tools"))
        return -1;
    int rc = -1;
    char *name = NULL;
    bool has_tools = tools && strspn(tools, " \t\r\n[]") != strlen(tools);
    if (!system_prompt || !tools || !tool_response_str) {
        violation(h->id, "rkllm_set_function_tools: system_prompt, tools and tool_response_str must be strings");
    } else if (has_tools && !(name = first_function_name(tools))) {
        fprintf(stderr, "E rkllm: tools JSON has no function name: %.80s\n", tools);
    } else {
        free(h->tool_name);
        h->tool_name = name;
        h->system_tokens = (*system_prompt ? token_count(system_prompt) : 0) + (has_tools ? token_count(tools) : 0);
        log_event("TOOLS", h->id, "first_function=%s system_tokens=%d tool_response=%s", name ? name : "-",
                  h->system_tokens, tool_response_str);
        rc = 0;
    }
    pthread_mutex_unlock(&h->lock);
    return rc;
}

EXPORT int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params)
{
    struct double_handle *h = lock_handle(handle, "rkllm_set_cross_attn_params");
    if (!h)
        return -1;
    if (refuse_if_running(h, "rkllm_set_cross_attn_params"))
        return -1;
    int rc = -1;
    const RKLLMCrossAttnParam *c = cross_attn_params;
    if (!c || !c->encoder_k_cache || !c->encoder_v_cache || !c->encoder_mask || !c->encoder_pos ||
        c->num_tokens <= 0) {
        violation(h->id, "rkllm_set_cross_attn_params: all four buffers must be set and num_tokens > 0");
    } else if (!h->params.extend_param.use_cross_attn) {
        fprintf(stderr, "E rkllm: cross attention is disabled (extend_param.use_cross_attn = 0)\n");
    } else {
        log_event("CROSS_ATTN", h->id, "num_tokens=%d", c->num_tokens);
        rc = 0;
    }
    pthread_mutex_unlock(&h->lock);
    return rc;
}

#endif
