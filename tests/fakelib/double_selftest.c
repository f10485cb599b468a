/*
 * Behavioural tests of the librkllmrt test double, driven through our rkllm.h exactly as a client
 * would. Usage: double_selftest MODELS_DIR [TEST...]; `double_selftest --list` prints the test
 * names. Exit status 0 only if every selected test passed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "rkllm.h"

enum { MAX_EVENTS = 4096, TEXT_CAP = 65536 };

static const char *models_dir;
static char work_dir[256]; /* short, so derived paths always fit PATH_MAX */
static char log_path[PATH_MAX];

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "  check failed at line %d: %s: ", __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fputc('\n', stderr);                                           \
            return 1;                                                      \
        }                                                                  \
    } while (0)

/* ---------------------------------------------------------------- helpers */

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    char text[TEXT_CAP];
    size_t text_len;
    int normal;
    int waiting;
    int finish;
    int error;
    int bad_waiting; /* WAITING text that is not a prefix ending inside a character */
    int after_finish; /* callbacks arriving after FINISH or ERROR */
    int pause_after_normal; /* return 1 once this many NORMAL callbacks arrived (0 = never) */
    int return_value;
    pthread_t callback_thread;
    double first_normal_ms;
    double finish_ms;
    double normal_at_ms[MAX_EVENTS];
    RKLLMPerfStat perf;
} collector;

static void collector_init(collector *c)
{
    memset(c, 0, sizeof *c);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->changed, NULL);
}

static void collector_destroy(collector *c)
{
    pthread_cond_destroy(&c->changed);
    pthread_mutex_destroy(&c->lock);
}

static bool ends_inside_character(const char *s)
{
    size_t len = strlen(s);
    if (len == 0)
        return false;
    size_t i = len - 1;
    while (i > 0 && ((unsigned char)s[i] & 0xC0) == 0x80)
        i--;
    unsigned char lead = (unsigned char)s[i];
    size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    return len - i < need;
}

static int on_result(RKLLMResult *result, void *userdata, LLMCallState state)
{
    collector *c = userdata;
    pthread_mutex_lock(&c->lock);
    if (c->finish || c->error)
        c->after_finish++;
    if (state == RKLLM_RUN_NORMAL || state == RKLLM_RUN_WAITING) {
        size_t len = strlen(result->text);
        if (c->text_len + len < TEXT_CAP) {
            memcpy(c->text + c->text_len, result->text, len + 1);
            c->text_len += len;
        }
    }
    int verdict = c->return_value;
    c->callback_thread = pthread_self();
    switch (state) {
    case RKLLM_RUN_NORMAL:
        if (c->normal < MAX_EVENTS)
            c->normal_at_ms[c->normal] = now_ms();
        if (c->normal++ == 0)
            c->first_normal_ms = c->normal_at_ms[0];
        if (c->pause_after_normal && c->normal >= c->pause_after_normal)
            verdict = 1;
        break;
    case RKLLM_RUN_WAITING:
        c->waiting++;
        if (!ends_inside_character(result->text))
            c->bad_waiting++;
        break;
    case RKLLM_RUN_FINISH:
        c->finish++;
        c->finish_ms = now_ms();
        c->perf = result->perf;
        break;
    case RKLLM_RUN_ERROR:
        c->error++;
        break;
    }
    pthread_cond_broadcast(&c->changed);
    pthread_mutex_unlock(&c->lock);
    return verdict;
}

static bool wait_for(collector *c, const int *counter, int count, double timeout_ms)
{
    double deadline = now_ms() + timeout_ms;
    pthread_mutex_lock(&c->lock);
    while (*counter < count && now_ms() < deadline) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 2000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&c->changed, &c->lock, &ts);
    }
    bool reached = *counter >= count;
    pthread_mutex_unlock(&c->lock);
    return reached;
}

static bool wait_for_normal(collector *c, int count, double timeout_ms)
{
    return wait_for(c, &c->normal, count, timeout_ms);
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median gap between NORMAL callbacks: one late wake-up on a loaded machine does not move it. */
static double median_token_interval_ms(const collector *c)
{
    static double gaps[MAX_EVENTS];
    int n = (c->normal < MAX_EVENTS ? c->normal : MAX_EVENTS) - 1;
    for (int i = 0; i < n; i++)
        gaps[i] = c->normal_at_ms[i + 1] - c->normal_at_ms[i];
    qsort(gaps, (size_t)n, sizeof *gaps, compare_doubles);
    return n > 0 ? gaps[n / 2] : 0;
}

static void model_path(char *out, const char *name)
{
    snprintf(out, PATH_MAX, "%s/%s", models_dir, name);
}

static RKLLMParam params_for(const char *path)
{
    RKLLMParam p = rkllm_createDefaultParam();
    p.model_path = path;
    p.max_context_len = 4096;
    p.max_new_tokens = 2048;
    p.top_k = 1;
    return p;
}

static int open_model(LLMHandle *h, const char *name)
{
    char path[PATH_MAX];
    model_path(path, name);
    RKLLMParam p = params_for(path);
    return rkllm_init(h, &p, on_result);
}

static int run_prompt(LLMHandle h, const char *prompt, int keep_history, collector *c)
{
    RKLLMInput in;
    memset(&in, 0, sizeof in);
    in.role = "user";
    in.input_type = RKLLM_INPUT_PROMPT;
    in.prompt_input = prompt;
    RKLLMInferParam infer;
    memset(&infer, 0, sizeof infer);
    infer.keep_history = keep_history;
    return rkllm_run(h, &in, &infer, c);
}

static int kv_size(LLMHandle h)
{
    int size = -1;
    return rkllm_get_kv_cache_size(h, &size) == 0 ? size : -1;
}

static int log_count(const char *needle)
{
    FILE *f = fopen(log_path, "r");
    if (!f)
        return 0;
    char line[4096];
    int count = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, needle))
            count++;
    fclose(f);
    return count;
}

static bool utf8_valid(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        int extra = *p < 0x80 ? 0 : (*p & 0xE0) == 0xC0 ? 1 : (*p & 0xF0) == 0xE0 ? 2 : (*p & 0xF8) == 0xF0 ? 3 : -1;
        if (extra < 0)
            return false;
        p++;
        for (int k = 0; k < extra; k++, p++)
            if ((*p & 0xC0) != 0x80)
                return false;
    }
    return true;
}

static void write_file(const char *path, const char *content)
{
    FILE *f = fopen(path, "w");
    if (f) {
        fputs(content, f);
        fclose(f);
    }
}

/* ---------------------------------------------------------------- tests */

static int test_tokens_and_determinism(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    collector a, b, other;
    collector_init(&a);
    collector_init(&b);
    collector_init(&other);
    CHECK(run_prompt(h, "Hello fleet", 0, &a) == 0, "run failed");
    CHECK(run_prompt(h, "Hello fleet", 0, &b) == 0, "run failed");
    CHECK(run_prompt(h, "Something else entirely", 0, &other) == 0, "run failed");
    CHECK(a.finish == 1 && a.error == 0 && a.after_finish == 0, "finish=%d error=%d after=%d", a.finish, a.error,
          a.after_finish);
    CHECK(a.perf.generate_tokens == 16, "generate_tokens=%d (reply_tokens 16)", a.perf.generate_tokens);
    CHECK(a.perf.prefill_tokens == 3, "prefill_tokens=%d for 11 bytes", a.perf.prefill_tokens);
    CHECK(fabsf(a.perf.memory_usage_mb - 64) < 0.01f, "memory_usage_mb=%g", (double)a.perf.memory_usage_mb);
    CHECK(!strcmp(a.text, b.text), "same input gave \"%s\" and \"%s\"", a.text, b.text);
    CHECK(strcmp(a.text, other.text) != 0, "different inputs gave the same reply \"%s\"", a.text);
    CHECK(utf8_valid(a.text), "reply is not valid UTF-8");
    CHECK(rkllm_destroy(h) == 0, "destroy failed");

    char path[PATH_MAX];
    model_path(path, "tiny-flat.rkllm");
    RKLLMParam p = params_for(path);
    p.max_new_tokens = 5;
    CHECK(rkllm_init(&h, &p, on_result) == 0, "init failed");
    collector capped;
    collector_init(&capped);
    CHECK(run_prompt(h, "Hello fleet", 0, &capped) == 0, "run failed");
    CHECK(capped.perf.generate_tokens == 5, "max_new_tokens=5 gave %d tokens", capped.perf.generate_tokens);
    CHECK(!strncmp(a.text, capped.text, capped.text_len), "capped reply is not a prefix of the full reply");
    CHECK(log_count("FINISH") == 4 && log_count("reason=length") == 1, "log lacks FINISH/length lines");
    return rkllm_destroy(h);
}

static int test_waiting_split(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    collector c;
    collector_init(&c);
    CHECK(run_prompt(h, "Tell me about the fleet of boards", 0, &c) == 0, "run failed");
    CHECK(c.waiting > 0, "no WAITING callbacks with split_utf8_every=2");
    CHECK(c.bad_waiting == 0, "%d WAITING texts did not end inside a character", c.bad_waiting);
    CHECK(c.perf.generate_tokens == 16 && c.normal == 16, "a split token must count once (tokens %d, NORMAL %d)",
          c.perf.generate_tokens, c.normal);
    CHECK(utf8_valid(c.text), "joined WAITING+NORMAL bytes are not valid UTF-8: %s", c.text);
    return rkllm_destroy(h);
}

static int test_fragment_and_think(void)
{
    setenv("RKLLM_DOUBLE_TPS", "0", 1);
    setenv("RKLLM_DOUBLE_PREFILL_MS", "0", 1);
    LLMHandle h;
    CHECK(open_model(&h, "deepseek-r1-distill-qwen-1.5b.rkllm") == 0, "init failed");
    collector c;
    collector_init(&c);
    CHECK(run_prompt(h, "Why is the sky blue?", 0, &c) == 0, "run failed");
    CHECK(!strncmp(c.text, "<think>\n", 8), "reply does not open a think block: %.40s", c.text);
    const char *close = strstr(c.text, "</think>");
    CHECK(close && close[8] != '\0', "no </think> followed by an answer: %s", c.text);
    CHECK(c.perf.generate_tokens == 48, "generate_tokens=%d", c.perf.generate_tokens);
    CHECK(c.normal > c.perf.generate_tokens - c.waiting, "fragment_every=7 produced no extra NORMAL callbacks");
    CHECK(utf8_valid(c.text), "reply is not valid UTF-8");
    return rkllm_destroy(h);
}

static int test_keep_history(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    collector first, second, fresh;
    collector_init(&first);
    collector_init(&second);
    collector_init(&fresh);
    const char *turn1 = "0123456789012345678901234567890123456789"; /* 40 bytes = 10 tokens */
    CHECK(run_prompt(h, turn1, 1, &first) == 0, "run failed");
    CHECK(first.perf.prefill_tokens == 10, "prefill_tokens=%d", first.perf.prefill_tokens);
    CHECK(kv_size(h) == 26, "kv=%d after 10 prompt + 16 generated", kv_size(h));
    CHECK(run_prompt(h, "and now?", 1, &second) == 0, "run failed");
    CHECK(second.perf.prefill_tokens == 2, "second turn prefilled %d tokens, not only its own 2",
          second.perf.prefill_tokens);
    CHECK(kv_size(h) == 44, "kv=%d after 26 + 2 + 16", kv_size(h));
    CHECK(run_prompt(h, turn1, 0, &fresh) == 0, "run failed");
    CHECK(fresh.perf.prefill_tokens == 10 && kv_size(h) == 26, "keep_history=0 did not start empty (kv=%d)",
          kv_size(h));
    return rkllm_destroy(h);
}

/* Handles of one model keep separate histories; a reply continues the text in its handle's cache, however
 * that text got there (turn by turn or prefilled whole), and only uncached tokens are prefilled. */
static int test_history_per_handle(void)
{
    setenv("RKLLM_DOUBLE_REPLY_TOKENS", "6", 1);
    LLMHandle a, b, whole;
    CHECK(open_model(&a, "tiny-flat.rkllm") == 0 && open_model(&b, "tiny-flat.rkllm") == 0 &&
              open_model(&whole, "tiny-flat.rkllm") == 0,
          "init of three handles of one model failed");
    collector a1, a2, b1, b2, w;
    collector *all[] = {&a1, &a2, &b1, &b2, &w};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        collector_init(all[i]);
    const char *next = "and then?"; /* 9 bytes = 3 tokens */
    CHECK(run_prompt(a, "first conversation", 1, &a1) == 0 && run_prompt(b, "second conversation", 1, &b1) == 0,
          "first turns failed");
    CHECK(run_prompt(a, next, 1, &a2) == 0 && run_prompt(b, next, 1, &b2) == 0, "second turns failed");
    CHECK(a2.perf.prefill_tokens == 3, "the second turn prefilled %d tokens, not its own 3", a2.perf.prefill_tokens);
    CHECK(strcmp(a2.text, b2.text), "two handles with different histories gave the same reply \"%s\"", a2.text);
    static char history[TEXT_CAP + 64];
    snprintf(history, sizeof history, "first conversation%s%s", a1.text, next);
    CHECK(run_prompt(whole, history, 0, &w) == 0, "whole-history run failed");
    CHECK(!strcmp(w.text, a2.text), "the history prefilled whole replied \"%s\", turn by turn \"%s\"", w.text,
          a2.text);
    CHECK(w.perf.prefill_tokens > a2.perf.prefill_tokens, "prefilling the whole history cost no more");
    CHECK(rkllm_clear_kv_cache(a, 0, NULL, NULL) == 0, "clear failed");
    collector fresh;
    collector_init(&fresh);
    CHECK(run_prompt(a, next, 1, &fresh) == 0 && strcmp(fresh.text, a2.text), "a cleared cache still remembered");
    collector_destroy(&fresh);
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        collector_destroy(all[i]);
    return rkllm_destroy(a) | rkllm_destroy(b) | rkllm_destroy(whole);
}

static int test_clear_kv_cache(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    CHECK(rkllm_set_chat_template(h, "You are a helpful assistant on a fleet.", "<u>", "<a>") == 0,
          "set_chat_template failed"); /* 39 bytes = 10 system tokens */
    CHECK(rkllm_clear_kv_cache(h, 1, NULL, NULL) == 0 && kv_size(h) == 0,
          "clearing an empty cache invented %d system positions", kv_size(h));
    collector a, b;
    collector_init(&a);
    collector_init(&b);
    CHECK(run_prompt(h, "hi there", 1, &a) == 0, "run failed");
    CHECK(a.perf.prefill_tokens == 12, "first turn prefill %d, expected 10 system + 2", a.perf.prefill_tokens);
    CHECK(kv_size(h) == 28, "kv=%d", kv_size(h));
    CHECK(rkllm_clear_kv_cache(h, 1, NULL, NULL) == 0, "clear failed");
    CHECK(kv_size(h) == 10, "clear keeping the system prompt left kv=%d", kv_size(h));
    CHECK(run_prompt(h, "hi there", 1, &b) == 0, "run failed");
    CHECK(b.perf.prefill_tokens == 2, "system prompt prefilled again (%d)", b.perf.prefill_tokens);
    int start = 0, end = 8;
    CHECK(rkllm_clear_kv_cache(h, 0, &start, &end) == 0 && kv_size(h) == 20, "ranged clear left kv=%d",
          kv_size(h));
    CHECK(rkllm_clear_kv_cache(h, 0, &start, NULL) == -1, "half-NULL range accepted");
    CHECK(log_count("VIOLATION") == 1, "half-NULL range not reported");
    CHECK(rkllm_clear_kv_cache(h, 0, NULL, NULL) == 0 && kv_size(h) == 0, "full clear left kv=%d", kv_size(h));
    return rkllm_destroy(h);
}

static int test_callback_pause(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    collector c;
    collector_init(&c);
    c.pause_after_normal = 3;
    CHECK(run_prompt(h, "12345678", 1, &c) == 0, "paused run did not return 0");
    CHECK(c.normal == 3 && c.finish == 1 && c.after_finish == 0, "normal=%d finish=%d", c.normal, c.finish);
    CHECK(c.perf.generate_tokens == 3, "perf.generate_tokens=%d", c.perf.generate_tokens);
    CHECK(kv_size(h) == 5, "KV cache not kept on pause (kv=%d, expected 2 + 3)", kv_size(h));
    CHECK(log_count("reason=callback") == 1, "pause not logged");
    return rkllm_destroy(h);
}

typedef struct {
    LLMHandle handle;
    collector *c;
    int rc;
    double returned_ms;
} run_thread_args;

static void *run_in_thread(void *arg)
{
    run_thread_args *a = arg;
    a->rc = run_prompt(a->handle, "a long story please", 0, a->c);
    a->returned_ms = now_ms();
    return NULL;
}

typedef struct {
    LLMHandle handle;
    collector c;
    run_thread_args args;
    pthread_t thread;
} background_run;

/* Starts a 1000-token run of tiny-flat on its own thread and waits for its first token. */
static int start_long_run(background_run *b, const char *tokens_per_second)
{
    setenv("RKLLM_DOUBLE_TPS", tokens_per_second, 1);
    setenv("RKLLM_DOUBLE_REPLY_TOKENS", "1000", 1);
    CHECK(open_model(&b->handle, "tiny-flat.rkllm") == 0, "init failed");
    collector_init(&b->c);
    b->args = (run_thread_args){.handle = b->handle, .c = &b->c};
    pthread_create(&b->thread, NULL, run_in_thread, &b->args);
    CHECK(wait_for_normal(&b->c, 1, 5000), "no tokens arrived");
    return 0;
}

static int test_abort_from_other_thread(void)
{
    background_run b;
    CHECK(start_long_run(&b, "50") == 0, "could not start a run");
    CHECK(wait_for_normal(&b.c, 5, 5000), "tokens stopped arriving");
    CHECK(rkllm_is_running(b.handle) == 0, "is_running should be 0 (1.2.3: running) during a run");
    pthread_mutex_lock(&b.c.lock);
    int at_abort = b.c.normal;
    pthread_mutex_unlock(&b.c.lock);
    double abort_ms = now_ms();
    CHECK(rkllm_abort(b.handle) == 0, "abort failed");
    pthread_join(b.thread, NULL);
    CHECK(b.args.rc == 0 && b.c.finish == 1 && b.c.error == 0, "rc=%d finish=%d error=%d", b.args.rc, b.c.finish,
          b.c.error);
    CHECK(b.c.normal <= at_abort + 1, "%d tokens arrived after abort", b.c.normal - at_abort);
    CHECK(b.args.returned_ms - abort_ms < 150, "run returned %.1f ms after abort (token interval 20 ms)",
          b.args.returned_ms - abort_ms);
    CHECK(rkllm_is_running(b.handle) != 0, "is_running still reports a run");
    CHECK(log_count("ABORT") == 1 && log_count("reason=abort") == 1, "abort not logged");
    return rkllm_destroy(b.handle);
}

static int test_slow_abort(void)
{
    setenv("RKLLM_DOUBLE_SLOW_ABORT_MS", "300", 1);
    background_run b;
    CHECK(start_long_run(&b, "100") == 0, "could not start a run");
    double abort_ms = now_ms();
    CHECK(rkllm_abort(b.handle) == 0, "abort failed");
    pthread_join(b.thread, NULL);
    double took = b.args.returned_ms - abort_ms;
    CHECK(took >= 299 && took < 450, "abort with slow_abort_ms=300 took effect after %.1f ms", took);
    CHECK(b.c.finish == 1, "no FINISH after a slow abort");
    return rkllm_destroy(b.handle);
}

/* Polls the log, since a fault is logged on the run's thread a moment after its last callback. */
static bool wait_for_log(const char *needle, double timeout_ms)
{
    double deadline = now_ms() + timeout_ms;
    while (log_count(needle) == 0) {
        if (now_ms() > deadline)
            return false;
        usleep(1000);
    }
    return true;
}

static int test_hang_released_by_abort(void)
{
    setenv("RKLLM_DOUBLE_HANG_AT", "3", 1);
    background_run b;
    CHECK(start_long_run(&b, "0") == 0, "could not start a run");
    CHECK(wait_for_log("HANG", 5000), "the hang fault was not logged");
    CHECK(log_count("abort=releases") == 1, "hang not logged as released by abort");
    pthread_mutex_lock(&b.c.lock);
    int before_abort = b.c.normal;
    pthread_mutex_unlock(&b.c.lock);
    CHECK(before_abort == 3, "%d tokens before a hang at token 3 (the run is flat out)", before_abort);
    CHECK(rkllm_is_running(b.handle) == 0, "is_running should report the hung run");
    CHECK(rkllm_abort(b.handle) == 0, "abort failed");
    pthread_join(b.thread, NULL);
    CHECK(b.args.rc == 0 && b.c.finish == 1 && b.c.normal == 3, "rc=%d finish=%d normal=%d", b.args.rc, b.c.finish,
          b.c.normal);
    CHECK(log_count("reason=abort") == 1, "the released hang did not finish as an abort");
    return rkllm_destroy(b.handle);
}

static int test_concurrent_run_refused(void)
{
    background_run b;
    CHECK(start_long_run(&b, "50") == 0, "could not start a run");
    collector intruder;
    collector_init(&intruder);
    CHECK(run_prompt(b.handle, "me too", 0, &intruder) == -1, "second concurrent rkllm_run was accepted");
    CHECK(intruder.normal == 0 && intruder.finish == 0, "refused run produced callbacks");
    CHECK(log_count("VIOLATION") == 1 && log_count("concurrent rkllm_run") == 1, "violation not logged");
    CHECK(rkllm_clear_kv_cache(b.handle, 0, NULL, NULL) == -1, "clear_kv_cache during a run was accepted");
    rkllm_abort(b.handle);
    pthread_join(b.thread, NULL);
    CHECK(b.args.rc == 0 && b.c.finish == 1, "first run did not finish cleanly");
    return rkllm_destroy(b.handle);
}

static int test_bad_callback_return(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    collector c;
    collector_init(&c);
    c.return_value = -1; /* what a ctypes callback returning None hands back */
    CHECK(run_prompt(h, "hello", 0, &c) == 0, "run failed");
    CHECK(c.perf.generate_tokens == 16, "an undefined return value changed generation (%d tokens)",
          c.perf.generate_tokens);
    CHECK(log_count("VIOLATION") >= 16 && log_count("callback returned -1") >= 16,
          "bad callback returns not reported (%d)", log_count("callback returned -1"));
    return rkllm_destroy(h);
}

static int init_with(RKLLMParam p, const char *expect_in_log)
{
    int before = log_count(expect_in_log);
    LLMHandle h = (LLMHandle)&p;
    CHECK(rkllm_init(&h, &p, on_result) == -1, "init accepted a bad param (%s)", expect_in_log);
    CHECK(h == NULL, "failed init left a handle");
    CHECK(log_count(expect_in_log) == before + 1, "no VIOLATION line naming %s", expect_in_log);
    return 0;
}

static int test_bad_params(void)
{
    char path[PATH_MAX];
    model_path(path, "tiny-flat.rkllm");
    RKLLMParam p = params_for(path);
    int failures = 0;
    float as_float = 0.9f;
    memcpy(&p.top_k, &as_float, sizeof as_float); /* top_p written into top_k by a shifted struct */
    failures += init_with(p, "param.top_k=");
    p = params_for(path);
    p.temperature = NAN;
    failures += init_with(p, "param.temperature=");
    p = params_for(path);
    p.top_p = 1.5f;
    failures += init_with(p, "param.top_p=");
    p = params_for(path);
    p.max_context_len = 0;
    failures += init_with(p, "param.max_context_len=");
    p = params_for(path);
    p.max_new_tokens = -1;
    failures += init_with(p, "param.max_new_tokens=");
    p = params_for(path);
    p.extend_param.enabled_cpus_mask = 0;
    failures += init_with(p, "enabled_cpus_mask=0x0");
    p = params_for(path);
    p.extend_param.n_batch = 2;
    failures += init_with(p, "n_batch=2");
    p = params_for(path);
    p.img_start = NULL;
    failures += init_with(p, "img_start");
    CHECK(log_count("VIOLATION") == 8, "expected exactly one VIOLATION per bad field, got %d",
          log_count("VIOLATION"));
    CHECK(failures == 0, "%d bad params slipped through", failures);
    return 0;
}

static int test_defaults(void)
{
    RKLLMParam p = rkllm_createDefaultParam();
    CHECK(p.top_k == 40 && fabsf(p.top_p - 0.9f) < 1e-6f && fabsf(p.temperature - 0.8f) < 1e-6f &&
              fabsf(p.repeat_penalty - 1.1f) < 1e-6f && p.frequency_penalty == 0 && p.mirostat == 0,
          "sampling defaults wrong");
    CHECK(p.extend_param.base_domain_id == 0 && p.extend_param.enabled_cpus_num == 4 &&
              p.extend_param.n_batch == 1 && p.extend_param.enabled_cpus_mask == (CPU4 | CPU5 | CPU6 | CPU7),
          "extend_param defaults wrong");
    CHECK(p.model_path == NULL && p.n_keep == -1, "model_path/n_keep defaults wrong");
    return 0;
}

static int test_error_at_token(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "faulty-run-error.rkllm") == 0, "init failed");
    for (int attempt = 0; attempt < 2; attempt++) {
        collector c;
        collector_init(&c);
        CHECK(run_prompt(h, "hello", 1, &c) == -1, "run with error_at_token did not return -1");
        CHECK(c.normal == 5 && c.error == 1 && c.finish == 0, "normal=%d error=%d finish=%d", c.normal, c.error,
              c.finish);
        CHECK(kv_size(h) == 0, "failed run left kv=%d", kv_size(h));
    }
    CHECK(log_count("reason=error_at_token") == 2, "errors not logged");
    return rkllm_destroy(h);
}

static int test_context_overflow(void)
{
    char path[PATH_MAX];
    model_path(path, "tiny-flat.rkllm");
    RKLLMParam p = params_for(path);
    p.max_context_len = 64;
    LLMHandle h;
    CHECK(rkllm_init(&h, &p, on_result) == 0, "init failed");
    char prompt[301];
    memset(prompt, 'x', 300);
    prompt[300] = '\0';
    collector big, small;
    collector_init(&big);
    collector_init(&small);
    CHECK(run_prompt(h, prompt, 0, &big) == -1, "75-token prompt accepted with max_context_len 64");
    CHECK(big.error == 1 && big.normal == 0 && big.finish == 0, "overflow callbacks wrong");
    CHECK(run_prompt(h, "short", 0, &small) == 0 && small.finish == 1, "handle unusable after overflow");
    CHECK(log_count("reason=context_overflow") == 1, "overflow not logged");
    return rkllm_destroy(h);
}

static int test_fail_init(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "faulty-init.rkllm") == -1, "fail_init model initialised");
    CHECK(open_model(&h, "old-toolkit-1.1.4.rkllm") == -1, "1.1.4 model initialised");
    CHECK(open_model(&h, "no-such-model.rkllm") == -1, "missing model initialised");
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/wrong-format.rkllm", work_dir);
    write_file(path, "format = rkllm-double/2\nname = x\n");
    RKLLMParam p = params_for(path);
    CHECK(rkllm_init(&h, &p, on_result) == -1, "wrong format line accepted");
    write_file(path, "format = rkllm-double/1\nname = x\ntoolkit_version = 1.2.3\nmax_context = 64\n"
                     "memory_mb = 1\nvocab = a|b\nbogus_key = 1\n");
    CHECK(rkllm_init(&h, &p, on_result) == -1, "unknown key accepted");
    setenv("RKLLM_DOUBLE_FAIL_INIT", "1", 1);
    CHECK(open_model(&h, "tiny-flat.rkllm") == -1, "RKLLM_DOUBLE_FAIL_INIT ignored");
    CHECK(log_count("INIT_FAILED") == 6, "%d INIT_FAILED lines, expected 6", log_count("INIT_FAILED"));
    CHECK(log_count("wrong format line") == 1 && log_count("1.1.4") == 1 && log_count("bogus_key") == 1,
          "failure reasons not named");
    return 0;
}

static int test_domain_memory(void)
{
    setenv("RKLLM_DOUBLE_NPU_DOMAIN_MB", "3000", 1);
    char qwen[PATH_MAX], r1[PATH_MAX];
    model_path(qwen, "qwen2.5-1.5b-instruct.rkllm");
    model_path(r1, "deepseek-r1-distill-qwen-1.5b.rkllm");
    RKLLMParam pq = params_for(qwen), pr = params_for(r1);
    LLMHandle first, second, third;
    CHECK(rkllm_init(&first, &pq, on_result) == 0, "first model failed");
    CHECK(rkllm_init(&second, &pr, on_result) == -1, "1659 + 1800 MB fitted a 3000 MB domain");
    CHECK(log_count("failed to malloc npu memory") == 1, "no malloc failure in the log");
    pr.extend_param.base_domain_id = 1;
    CHECK(rkllm_init(&second, &pr, on_result) == 0, "second model failed in domain 1");
    pr.extend_param.base_domain_id = 0;
    CHECK(rkllm_destroy(first) == 0, "destroy failed");
    CHECK(rkllm_init(&third, &pr, on_result) == 0, "domain 0 memory not released by destroy");
    CHECK(rkllm_destroy(second) == 0 && rkllm_destroy(third) == 0, "destroy failed");
    return 0;
}

/*
 * Timing checks allow lateness (a loaded CI machine wakes threads late) but not earliness: the double
 * sleeps to absolute deadlines, so it is never faster than configured.
 */
static int test_decode_rate(void)
{
    setenv("RKLLM_DOUBLE_TPS", "200", 1);
    setenv("RKLLM_DOUBLE_REPLY_TOKENS", "100", 1);
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    collector c;
    collector_init(&c);
    CHECK(run_prompt(h, "rate", 0, &c) == 0, "run failed");
    double observed = 1000.0 / median_token_interval_ms(&c);
    CHECK(fabs(observed - 200) < 20, "median gap between callbacks gives %.1f tok/s, configured 200", observed);
    double reported = c.perf.generate_tokens * 1000.0 / c.perf.generate_time_ms;
    CHECK(reported <= 202, "perf says %.1f tok/s, faster than the configured 200", reported);
    double observed_ms = c.finish_ms - c.first_normal_ms;
    CHECK(fabs(c.perf.generate_time_ms - observed_ms) < 10, "perf generate_time_ms %.1f, observed %.1f",
          (double)c.perf.generate_time_ms, observed_ms);
    return rkllm_destroy(h);
}

static int test_prefill_cost(void)
{
    setenv("RKLLM_DOUBLE_PREFILL_MS", "3", 1);
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    char prompt[401];
    memset(prompt, 'p', 400); /* 100 tokens */
    prompt[400] = '\0';
    collector c;
    collector_init(&c);
    double start = now_ms();
    CHECK(run_prompt(h, prompt, 0, &c) == 0, "run failed");
    double ttft = c.first_normal_ms - start;
    CHECK(ttft >= 299 && ttft < 400, "first token after %.1f ms, expected 100 tokens x 3 ms", ttft);
    CHECK(c.perf.prefill_time_ms >= 299 && c.perf.prefill_time_ms < 400 && c.perf.prefill_tokens == 100,
          "perf prefill %.1f ms / %d tokens", (double)c.perf.prefill_time_ms, c.perf.prefill_tokens);
    return rkllm_destroy(h);
}

static int test_abort_during_prefill(void)
{
    setenv("RKLLM_DOUBLE_PREFILL_MS", "20", 1);
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    collector c;
    collector_init(&c);
    run_thread_args args = {.handle = h, .c = &c};
    pthread_t t;
    double start = now_ms();
    pthread_create(&t, NULL, run_in_thread, &args); /* 19 bytes = 5 tokens = 100 ms of prefill */
    while (rkllm_is_running(h) != 0 && now_ms() - start < 5000)
        sched_yield();
    CHECK(rkllm_abort(h) == 0, "abort failed");
    pthread_join(t, NULL);
    CHECK(args.rc == 0 && c.finish == 1 && c.normal == 0, "rc=%d finish=%d tokens=%d", args.rc, c.finish, c.normal);
    CHECK(c.perf.prefill_time_ms < 90, "abort waited for the whole 100 ms prefill (%.1f ms)",
          (double)c.perf.prefill_time_ms);
    return rkllm_destroy(h);
}

static int test_token_input(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    int32_t ids[10] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    RKLLMInput in;
    memset(&in, 0, sizeof in);
    in.role = "user";
    in.input_type = RKLLM_INPUT_TOKEN;
    in.token_input.input_ids = ids;
    in.token_input.n_tokens = 10;
    RKLLMInferParam infer;
    memset(&infer, 0, sizeof infer);
    collector a, b;
    collector_init(&a);
    collector_init(&b);
    CHECK(rkllm_run(h, &in, &infer, &a) == 0 && rkllm_run(h, &in, &infer, &b) == 0, "token run failed");
    CHECK(a.perf.prefill_tokens == 10 && a.perf.generate_tokens == 16, "prefill %d generate %d",
          a.perf.prefill_tokens, a.perf.generate_tokens);
    CHECK(!strcmp(a.text, b.text), "token input not deterministic");
    in.role = NULL;
    CHECK(rkllm_run(h, &in, &infer, &a) == -1 && log_count("input.role") == 1, "NULL role accepted");
    return rkllm_destroy(h);
}

static int test_tools(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    const char *tools = "[{\"type\": \"function\", \"function\": {\"name\": \"get_current_weather\", "
                        "\"parameters\": {\"type\": \"object\"}}}]";
    CHECK(rkllm_set_function_tools(h, "You can call tools.", tools, "tool_response") == 0, "set tools failed");
    collector call, plain, tool_result;
    collector_init(&call);
    collector_init(&plain);
    collector_init(&tool_result);
    CHECK(run_prompt(h, "What is the weather in Paris?", 0, &call) == 0, "run failed");
    CHECK(!strcmp(call.text, "<tool_call>{\"name\": \"get_current_weather\", \"arguments\": {\"location\": "
                             "\"Paris\"}}</tool_call>"),
          "tool call reply was %s", call.text);
    CHECK(run_prompt(h, "Tell me a joke", 0, &plain) == 0 && !strstr(plain.text, "tool_call"),
          "tool call without the trigger word");
    RKLLMInput in;
    memset(&in, 0, sizeof in);
    in.role = "tool";
    in.prompt_input = "{\"weather\": \"sunny\"}";
    RKLLMInferParam infer;
    memset(&infer, 0, sizeof infer);
    CHECK(rkllm_run(h, &in, &infer, &tool_result) == 0 && !strstr(tool_result.text, "tool_call"),
          "a tool result triggered another tool call");
    return rkllm_destroy(h);
}

static int test_prompt_cache_and_lora(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    char cache[PATH_MAX], missing[PATH_MAX], lora_file[PATH_MAX];
    snprintf(cache, sizeof cache, "%s/cache.bin", work_dir);
    snprintf(missing, sizeof missing, "%s/missing.bin", work_dir);
    snprintf(lora_file, sizeof lora_file, "%s/adapter.rkllm", work_dir);
    RKLLMPromptCacheParam save = {.save_prompt_cache = 1, .prompt_cache_path = cache};
    RKLLMInput in;
    memset(&in, 0, sizeof in);
    in.role = "user";
    in.prompt_input = "You are a fleet assistant.";
    RKLLMInferParam infer;
    memset(&infer, 0, sizeof infer);
    infer.prompt_cache_params = &save;
    collector c;
    collector_init(&c);
    CHECK(rkllm_run(h, &in, &infer, &c) == 0, "run with save_prompt_cache failed");
    CHECK(access(cache, R_OK) == 0, "prompt cache file not written");
    CHECK(rkllm_load_prompt_cache(h, cache) == 0, "saved cache not loadable");
    CHECK(rkllm_release_prompt_cache(h) == 0, "release failed");
    CHECK(rkllm_load_prompt_cache(h, missing) == -1, "missing cache loaded");

    RKLLMLoraAdapter adapter = {.lora_adapter_path = lora_file, .lora_adapter_name = "style", .scale = 1.0f};
    CHECK(rkllm_load_lora(h, &adapter) == -1, "missing lora file loaded");
    write_file(lora_file, "adapter");
    CHECK(rkllm_load_lora(h, &adapter) == 0, "lora load failed");
    RKLLMLoraParam use = {.lora_adapter_name = "style"}, unknown = {.lora_adapter_name = "nope"};
    infer.prompt_cache_params = NULL;
    infer.lora_params = &use;
    CHECK(rkllm_run(h, &in, &infer, &c) == 0, "run with loaded lora failed");
    infer.lora_params = &unknown;
    CHECK(rkllm_run(h, &in, &infer, &c) == -1, "run with an unloaded lora accepted");
    CHECK(log_count("lora=style") == 1, "lora not logged with the run");
    return rkllm_destroy(h);
}

static int test_segv_at_token(void)
{
    fflush(NULL);
    pid_t child = fork();
    CHECK(child >= 0, "fork failed");
    if (child == 0) {
        LLMHandle h;
        collector c;
        collector_init(&c);
        if (open_model(&h, "faulty-segv.rkllm") == 0)
            run_prompt(h, "crash", 0, &c);
        _exit(0);
    }
    int status;
    CHECK(waitpid(child, &status, 0) == child, "waitpid failed");
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV, "child status 0x%x, expected SIGSEGV", status);
    return 0;
}

typedef struct {
    LLMHandle handle;
    volatile sig_atomic_t stop;
    long calls;
} hammer_args;

static void *hammer_handle(void *arg)
{
    hammer_args *a = arg;
    while (!a->stop) {
        kv_size(a->handle);
        a->calls++;
    }
    return NULL;
}

/* A child forked while another thread is inside the library (holding its locks) must not deadlock. */
static int test_fork_while_busy(void)
{
    LLMHandle h;
    CHECK(open_model(&h, "tiny-flat.rkllm") == 0, "init failed");
    hammer_args hammer = {.handle = h};
    pthread_t t;
    pthread_create(&t, NULL, hammer_handle, &hammer);
    int failed_round = -1, status = 0;
    bool stuck = false;
    for (int round = 0; round < 20 && failed_round < 0; round++) {
        fflush(NULL);
        pid_t child = fork();
        CHECK(child >= 0, "fork failed");
        if (child == 0) {
            LLMHandle fresh;
            collector mine;
            collector_init(&mine);
            bool ok = rkllm_is_running(h) == 1 && open_model(&fresh, "tiny-flat.rkllm") == 0 &&
                      run_prompt(fresh, "child", 0, &mine) == 0 && rkllm_destroy(fresh) == 0;
            _exit(ok ? 0 : 1);
        }
        double deadline = now_ms() + 5000;
        while (waitpid(child, &status, WNOHANG) == 0 && !(stuck = now_ms() >= deadline))
            sched_yield();
        if (stuck) {
            kill(child, SIGKILL);
            waitpid(child, &status, 0);
        }
        if (stuck || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
            failed_round = round;
    }
    hammer.stop = 1;
    pthread_join(t, NULL);
    CHECK(failed_round < 0, "child %d: status 0x%x%s", failed_round, status, stuck ? " (deadlocked)" : "");
    CHECK(hammer.calls > 0, "the busy thread never got into the library");
    return rkllm_destroy(h);
}

static int test_destroy_misuse(void)
{
    background_run b;
    CHECK(start_long_run(&b, "100") == 0, "could not start a run");
    CHECK(rkllm_destroy(b.handle) == 0, "destroy during a run failed");
    pthread_join(b.thread, NULL);
    CHECK(b.c.finish == 1 && b.args.rc == 0, "run interrupted by destroy did not finish");
    CHECK(log_count("rkllm_destroy while rkllm_run") == 1, "destroy during run not reported");
    collector late;
    collector_init(&late);
    CHECK(run_prompt(b.handle, "after", 0, &late) == -1 && rkllm_destroy(b.handle) == -1,
          "destroyed handle still usable");
    CHECK(log_count("unknown or destroyed") == 2, "use after destroy not reported");
    return 0;
}

static void *run_own_model(void *arg)
{
    run_thread_args *a = arg;
    a->rc = open_model(&a->handle, "tiny-flat.rkllm");
    if (a->rc == 0) {
        a->rc = run_prompt(a->handle, "parallel", 1, a->c);
        a->rc |= rkllm_destroy(a->handle);
    }
    return NULL;
}

static int test_parallel_handles(void)
{
    setenv("RKLLM_DOUBLE_TPS", "200", 1);
    setenv("RKLLM_DOUBLE_REPLY_TOKENS", "40", 1);
    enum { N = 4 };
    collector c[N];
    run_thread_args args[N];
    pthread_t t[N];
    double start = now_ms();
    for (int i = 0; i < N; i++) {
        collector_init(&c[i]);
        args[i] = (run_thread_args){.c = &c[i]};
        pthread_create(&t[i], NULL, run_own_model, &args[i]);
    }
    for (int i = 0; i < N; i++)
        pthread_join(t[i], NULL);
    double took = now_ms() - start;
    for (int i = 0; i < N; i++) {
        CHECK(args[i].rc == 0 && c[i].perf.generate_tokens == 40, "handle %d: rc=%d tokens=%d", i, args[i].rc,
              c[i].perf.generate_tokens);
        CHECK(!strcmp(c[i].text, c[0].text), "handle %d replied differently to the same prompt", i);
        collector_destroy(&c[i]);
    }
    CHECK(took < 600, "%d handles of 200 ms each took %.0f ms: handles serialised each other", N, took);
    return 0;
}

/* Every shipped model initialises, except the two whose purpose is to fail at init. */
/* ---------------------------------------------------------------- hidden-layer mode */

enum { HIDDEN_EMBD = 32, HIDDEN_MAX_TOKENS = 64 };

typedef struct {
    int normal;
    int finish;
    int embd_size;
    int num_tokens;
    const float *pointer; /* kept only to prove it is garbage after the callback */
    float copy[HIDDEN_MAX_TOKENS * HIDDEN_EMBD];
    char text[64];
    RKLLMPerfStat perf;
} hidden_collector;

static int on_hidden(RKLLMResult *result, void *userdata, LLMCallState state)
{
    hidden_collector *c = userdata;
    if (state == RKLLM_RUN_NORMAL) {
        c->normal++;
        snprintf(c->text, sizeof c->text, "%s", result->text ? result->text : "(null)");
        const RKLLMResultLastHiddenLayer *layer = &result->last_hidden_layer;
        c->embd_size = layer->embd_size;
        c->num_tokens = layer->num_tokens;
        c->pointer = layer->hidden_states;
        if (layer->embd_size == HIDDEN_EMBD && layer->num_tokens <= HIDDEN_MAX_TOKENS)
            memcpy(c->copy, layer->hidden_states, sizeof(float) * HIDDEN_EMBD * (size_t)layer->num_tokens);
    } else if (state == RKLLM_RUN_FINISH) {
        c->finish++;
        c->perf = result->perf;
    }
    return 0;
}

static int run_hidden(LLMHandle h, const char *prompt, RKLLMInferMode mode, hidden_collector *c)
{
    memset(c, 0, sizeof *c);
    RKLLMInput in;
    memset(&in, 0, sizeof in);
    in.role = "user";
    in.input_type = RKLLM_INPUT_PROMPT;
    in.prompt_input = prompt;
    RKLLMInferParam infer;
    memset(&infer, 0, sizeof infer);
    infer.mode = mode;
    return rkllm_run(h, &in, &infer, c);
}

/* The documented feature of a byte string (tests/fakelib/README.md, "Hidden-layer mode"). */
static void expected_feature(double *acc, const char *bytes, size_t len, double weight)
{
    uint32_t state = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        state ^= (unsigned char)bytes[i];
        state *= 16777619u;
    }
    for (int d = 0; d < HIDDEN_EMBD; d++) {
        state = state * 1664525u + 1013904223u;
        acc[d] += weight * ((double)(state >> 8) / 8388608.0 - 1.0);
    }
}

static double cosine_last(const hidden_collector *a, const hidden_collector *b)
{
    const float *x = a->copy + (size_t)(a->num_tokens - 1) * HIDDEN_EMBD;
    const float *y = b->copy + (size_t)(b->num_tokens - 1) * HIDDEN_EMBD;
    double dot = 0, nx = 0, ny = 0;
    for (int d = 0; d < HIDDEN_EMBD; d++) {
        dot += (double)x[d] * y[d];
        nx += (double)x[d] * x[d];
        ny += (double)y[d] * y[d];
    }
    return dot / sqrt(nx * ny);
}

static int test_hidden_layer(void)
{
    LLMHandle h;
    char path[PATH_MAX];
    model_path(path, "tiny-embed.rkllm");
    RKLLMParam p = params_for(path);
    CHECK(rkllm_init(&h, &p, on_hidden) == 0, "init failed");
    static hidden_collector first, again, similar, other;
    const char *prompt = "the cat sat on the mat"; /* 22 bytes: 6 tokens */
    CHECK(run_hidden(h, prompt, RKLLM_INFER_GET_LAST_HIDDEN_LAYER, &first) == 0, "hidden-layer run failed");
    CHECK(first.normal == 1 && first.finish == 1, "%d NORMAL, %d FINISH callbacks", first.normal, first.finish);
    CHECK(first.embd_size == HIDDEN_EMBD && first.num_tokens == 6, "embd_size %d, num_tokens %d", first.embd_size,
          first.num_tokens);
    CHECK(!strcmp(first.text, ""), "hidden-layer callback carried text \"%s\"", first.text);
    CHECK(first.perf.generate_tokens == 0 && first.perf.prefill_tokens == 6, "perf: %d generated, %d prefilled",
          first.perf.generate_tokens, first.perf.prefill_tokens);
    CHECK(isnan(first.pointer[0]) && isnan(first.pointer[6 * HIDDEN_EMBD - 1]),
          "the buffer still holds numbers after the callback returned");
    /* Last row: every word plus a quarter of the last token's own bytes ("at" after "the m"). */
    double expected[HIDDEN_EMBD] = {0};
    const char *words[] = {"the", "cat", "sat", "on", "the", "mat"};
    for (size_t i = 0; i < sizeof words / sizeof *words; i++)
        expected_feature(expected, words[i], strlen(words[i]), 1.0);
    expected_feature(expected, "at", 2, 0.25);
    for (int d = 0; d < HIDDEN_EMBD; d++)
        CHECK(fabs(first.copy[5 * HIDDEN_EMBD + d] - expected[d]) < 1e-4, "last row [%d] = %f, documented %f", d,
              (double)first.copy[5 * HIDDEN_EMBD + d], expected[d]);
    /* Row 0 ("the ") holds only "the": "cat" starts in token 1. */
    double row0[HIDDEN_EMBD] = {0};
    expected_feature(row0, "the", 3, 1.0);
    expected_feature(row0, "the ", 4, 0.25);
    for (int d = 0; d < HIDDEN_EMBD; d++)
        CHECK(fabs(first.copy[d] - row0[d]) < 1e-4, "row 0 [%d] = %f, documented %f", d, (double)first.copy[d],
              row0[d]);
    CHECK(run_hidden(h, prompt, RKLLM_INFER_GET_LAST_HIDDEN_LAYER, &again) == 0, "second run failed");
    CHECK(!memcmp(first.copy, again.copy, sizeof(float) * 6 * HIDDEN_EMBD), "equal inputs gave different vectors");
    CHECK(run_hidden(h, "the cat sat on a mat", RKLLM_INFER_GET_LAST_HIDDEN_LAYER, &similar) == 0, "run failed");
    CHECK(run_hidden(h, "quantum chromodynamics lattice", RKLLM_INFER_GET_LAST_HIDDEN_LAYER, &other) == 0,
          "run failed");
    double near = cosine_last(&first, &similar), far = cosine_last(&first, &other);
    CHECK(near < 0.9999 && near > far + 0.3, "cosine to a similar text %.3f, to an unrelated one %.3f", near, far);
    CHECK(kv_size(h) == other.num_tokens, "KV holds %d tokens after a hidden-layer run of %d", kv_size(h),
          other.num_tokens);
    CHECK(run_hidden(h, prompt, RKLLM_INFER_GET_LOGITS, &other) == -1, "GET_LOGITS is not implemented by the double");
    CHECK(rkllm_destroy(h) == 0, "destroy failed");
    /* Prefill costs what generation's does; embd_size defaults to 1536 when the model file has none. */
    setenv("RKLLM_DOUBLE_PREFILL_MS", "2", 1);
    model_path(path, "tiny-flat.rkllm");
    p = params_for(path);
    CHECK(rkllm_init(&h, &p, on_hidden) == 0, "init failed");
    char long_prompt[201];
    memset(long_prompt, 'w', 200); /* 50 tokens */
    long_prompt[200] = '\0';
    double start = now_ms();
    CHECK(run_hidden(h, long_prompt, RKLLM_INFER_GET_LAST_HIDDEN_LAYER, &other) == 0, "run failed");
    double elapsed = now_ms() - start;
    CHECK(other.embd_size == 1536 && other.num_tokens == 50, "embd_size %d, num_tokens %d", other.embd_size,
          other.num_tokens);
    CHECK(elapsed >= 99 && other.perf.prefill_time_ms >= 99 && other.perf.prefill_time_ms < 200,
          "run took %.1f ms, prefill %.1f ms; expected 50 tokens x 2 ms", elapsed, (double)other.perf.prefill_time_ms);
    return rkllm_destroy(h);
}

static int test_shipped_models_load(void)
{
    DIR *dir = opendir(models_dir);
    CHECK(dir, "cannot list %s", models_dir);
    int loaded = 0, refused = 0;
    for (struct dirent *entry; (entry = readdir(dir));) {
        size_t len = strlen(entry->d_name);
        if (len < 7 || strcmp(entry->d_name + len - 6, ".rkllm") != 0)
            continue;
        bool must_fail = !strncmp(entry->d_name, "faulty-init", 11) || !strncmp(entry->d_name, "old-toolkit", 11);
        LLMHandle h;
        int rc = open_model(&h, entry->d_name);
        if (rc != (must_fail ? -1 : 0)) {
            closedir(dir);
            CHECK(false, "%s: rkllm_init returned %d", entry->d_name, rc);
        }
        if (rc == 0) {
            loaded++;
            rkllm_destroy(h);
        } else {
            refused++;
        }
    }
    closedir(dir);
    CHECK(loaded >= 6 && refused == 2, "loaded %d, refused %d", loaded, refused);
    return 0;
}

static int test_run_async(void)
{
    setenv("RKLLM_DOUBLE_TPS", "100", 1);
    char path[PATH_MAX];
    model_path(path, "tiny-flat.rkllm");
    RKLLMParam p = params_for(path);
    LLMHandle sync_handle, h;
    CHECK(rkllm_init(&sync_handle, &p, on_result) == 0, "init failed");
    RKLLMInput in;
    memset(&in, 0, sizeof in);
    in.role = "user";
    in.prompt_input = "async please";
    RKLLMInferParam infer;
    memset(&infer, 0, sizeof infer);
    collector c, intruder;
    collector_init(&c);
    collector_init(&intruder);
    CHECK(rkllm_run_async(sync_handle, &in, &infer, &c) == -1 && log_count("is_async = false") == 1,
          "rkllm_run_async accepted on a handle without is_async");
    CHECK(rkllm_destroy(sync_handle) == 0, "destroy failed");
    p.is_async = true;
    CHECK(rkllm_init(&h, &p, on_result) == 0, "init failed");
    double start = now_ms();
    CHECK(rkllm_run_async(h, &in, &infer, &c) == 0, "rkllm_run_async failed");
    double returned = now_ms() - start;
    memset(&in, 0xAB, sizeof in); /* the run must not depend on the caller's structs any more */
    CHECK(returned < 100, "rkllm_run_async blocked for %.0f ms of a 160 ms run", returned);
    CHECK(run_prompt(h, "me too", 0, &intruder) == -1, "rkllm_run accepted during an async run");
    CHECK(wait_for(&c, &c.finish, 1, 5000), "no FINISH from the async run");
    CHECK(c.perf.generate_tokens == 16 && !pthread_equal(c.callback_thread, pthread_self()),
          "async run: %d tokens, callbacks on the caller's thread: %d", c.perf.generate_tokens,
          pthread_equal(c.callback_thread, pthread_self()) != 0);
    double deadline = now_ms() + 5000;
    while (rkllm_is_running(h) == 0 && now_ms() < deadline)
        sched_yield();
    return rkllm_destroy(h);
}

static int test_legacy_114_library(void)
{
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    CHECK(len > 0, "readlink failed");
    exe[len] = '\0';
    char lib[PATH_MAX + 32];
    snprintf(lib, sizeof lib, "%s/librkllmrt_114.so", dirname(exe));
    void *legacy = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    CHECK(legacy, "cannot load %s: %s", lib, dlerror());
    const char *absent[] = {"rkllm_set_chat_template", "rkllm_set_function_tools", "rkllm_get_kv_cache_size",
                            "rkllm_set_cross_attn_params", "rkllm_clear_kv_cache"};
    for (size_t i = 0; i < sizeof absent / sizeof *absent; i++)
        CHECK(dlsym(legacy, absent[i]) == NULL, "%s exported by the 1.1.4 stand-in", absent[i]);
    CHECK(dlsym(legacy, "rkllm_run") && dlsym(legacy, "rkllm_init"), "core symbols missing");
    dlclose(legacy);
    return 0;
}

/* ---------------------------------------------------------------- driver */

typedef struct {
    const char *name;
    int (*run)(void);
} test_case;

static const test_case TESTS[] = {
    {"defaults", test_defaults},
    {"tokens_and_determinism", test_tokens_and_determinism},
    {"waiting_split", test_waiting_split},
    {"fragment_and_think", test_fragment_and_think},
    {"keep_history", test_keep_history},
    {"history_per_handle", test_history_per_handle},
    {"clear_kv_cache", test_clear_kv_cache},
    {"callback_pause", test_callback_pause},
    {"abort_from_other_thread", test_abort_from_other_thread},
    {"slow_abort", test_slow_abort},
    {"hang_released_by_abort", test_hang_released_by_abort},
    {"concurrent_run_refused", test_concurrent_run_refused},
    {"bad_callback_return", test_bad_callback_return},
    {"bad_params", test_bad_params},
    {"error_at_token", test_error_at_token},
    {"context_overflow", test_context_overflow},
    {"fail_init", test_fail_init},
    {"domain_memory", test_domain_memory},
    {"decode_rate", test_decode_rate},
    {"prefill_cost", test_prefill_cost},
    {"abort_during_prefill", test_abort_during_prefill},
    {"token_input", test_token_input},
    {"tools", test_tools},
    {"prompt_cache_and_lora", test_prompt_cache_and_lora},
    {"segv_at_token", test_segv_at_token},
    {"fork_while_busy", test_fork_while_busy},
    {"destroy_misuse", test_destroy_misuse},
    {"parallel_handles", test_parallel_handles},
    {"shipped_models_load", test_shipped_models_load},
    {"run_async", test_run_async},
    {"legacy_114_library", test_legacy_114_library},
    {"hidden_layer", test_hidden_layer},
};
enum { N_TESTS = sizeof TESTS / sizeof *TESTS };

static void reset_environment(const char *name)
{
    static const char *const overrides[] = {
        "RKLLM_DOUBLE_TPS",      "RKLLM_DOUBLE_PREFILL_MS",    "RKLLM_DOUBLE_REPLY_TOKENS",
        "RKLLM_DOUBLE_ERROR_AT", "RKLLM_DOUBLE_SEGV_AT",       "RKLLM_DOUBLE_FAIL_INIT",
        "RKLLM_DOUBLE_SLOW_ABORT_MS", "RKLLM_DOUBLE_NPU_DOMAIN_MB", "RKLLM_DOUBLE_HANG_AT",
        "RKLLM_DOUBLE_HANG_IGNORES_ABORT"};
    for (size_t i = 0; i < sizeof overrides / sizeof *overrides; i++)
        unsetenv(overrides[i]);
    snprintf(log_path, sizeof log_path, "%s/%s.log", work_dir, name);
    unlink(log_path);
    setenv("RKLLM_DOUBLE_LOG", log_path, 1);
}

static int run_test(const test_case *t)
{
    reset_environment(t->name);
    double start = now_ms();
    int failed = t->run() != 0;
    printf("%s %s (%.0f ms)\n", failed ? "FAIL" : "ok", t->name, now_ms() - start);
    fflush(stdout);
    return failed;
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "--list")) {
        for (int i = 0; i < N_TESTS; i++)
            puts(TESTS[i].name);
        return 0;
    }
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODELS_DIR [TEST...] | --list\n", argv[0]);
        return 2;
    }
    models_dir = argv[1];
    snprintf(work_dir, sizeof work_dir, "%s/rkllm-double-selftest.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(work_dir)) {
        perror("mkdtemp");
        return 2;
    }
    int failures = 0;
    for (int i = 0; i < N_TESTS; i++) {
        bool selected = argc == 2;
        for (int a = 2; a < argc; a++)
            selected |= !strcmp(argv[a], TESTS[i].name);
        if (selected)
            failures += run_test(&TESTS[i]);
    }
    for (int a = 2; a < argc; a++) {
        bool known = false;
        for (int i = 0; i < N_TESTS; i++)
            known |= !strcmp(argv[a], TESTS[i].name);
        if (!known) {
            fprintf(stderr, "unknown test %s\n", argv[a]);
            failures++;
        }
    }
    char cleanup[PATH_MAX + 16];
    snprintf(cleanup, sizeof cleanup, "rm -rf '%s'", work_dir);
    if (system(cleanup) != 0)
        fprintf(stderr, "could not remove %s\n", work_dir);
    return failures ? 1 : 0;
}
