/*
 * C11 declarations of the librkllmrt 1.2.3 API, written for this project from the documented ABI
 * (field order, C types, enum values, prototypes). The vendor header includes <cstdint> and so only
 * compiles as C++; this one is plain C11 with the same layout, checked by the _Static_asserts below
 * and by layout_probe.c against tests/fakelib/reference-layout-1.2.3.txt.
 */
#ifndef RKLLM_FLEET_RKLLM_H
#define RKLLM_FLEET_RKLLM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CPU0 (1 << 0)
#define CPU1 (1 << 1)
#define CPU2 (1 << 2)
#define CPU3 (1 << 3)
#define CPU4 (1 << 4)
#define CPU5 (1 << 5)
#define CPU6 (1 << 6)
#define CPU7 (1 << 7)

typedef void *LLMHandle;

typedef enum {
    RKLLM_RUN_NORMAL = 0,
    RKLLM_RUN_WAITING = 1, /* text holds bytes of an incomplete UTF-8 character */
    RKLLM_RUN_FINISH = 2,  /* perf is filled only in this state */
    RKLLM_RUN_ERROR = 3
} LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT = 0,
    RKLLM_INPUT_TOKEN = 1,
    RKLLM_INPUT_EMBED = 2,
    RKLLM_INPUT_MULTIMODAL = 3
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
    RKLLM_INFER_GET_LOGITS = 2
} RKLLMInferMode;

typedef struct {
    int32_t base_domain_id; /* IOMMU domain (~4 GB each) the model's NPU memory starts in */
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask; /* CPU0..CPU7 bits */
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
    bool is_async;
    const char *img_start;
    const char *img_end;
    const char *img_content;
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;

typedef struct {
    const char *role; /* "user" or "tool" */
    bool enable_thinking;
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

typedef struct {
    float *encoder_k_cache;
    float *encoder_v_cache;
    float *encoder_mask;
    int32_t *encoder_pos;
    int num_tokens;
} RKLLMCrossAttnParam;

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
    int keep_history;
} RKLLMInferParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;

typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text; /* valid only during the callback */
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf; /* an embedded struct despite the vendor comment calling it a pointer */
} RKLLMResult;

/* Return 0 to continue, 1 to pause (generation stops, KV cache kept); 1.2.3 defines no other value. */
typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);

RKLLMParam rkllm_createDefaultParam(void);
int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback);
int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter);
int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path);
int rkllm_release_prompt_cache(LLMHandle handle);
int rkllm_destroy(LLMHandle handle);
int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params, void *userdata);
int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                    void *userdata);
int rkllm_abort(LLMHandle handle);
/* 1.2.3 documents 0 while a task is running and non-zero otherwise (1.3.0 inverts the comment). */
int rkllm_is_running(LLMHandle handle);
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos);
int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes);
int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                            const char *prompt_postfix);
int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                             const char *tool_response_str);
int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params);

#if !defined(__cplusplus) && defined(__LP64__)
_Static_assert(sizeof(RKLLMExtendParam) == 120, "RKLLMExtendParam layout");
_Static_assert(sizeof(RKLLMParam) == 208, "RKLLMParam layout");
_Static_assert(offsetof(RKLLMParam, extend_param) == 88, "RKLLMParam.extend_param offset");
_Static_assert(sizeof(RKLLMMultiModalInput) == 48, "RKLLMMultiModalInput layout");
_Static_assert(sizeof(RKLLMInput) == 64, "RKLLMInput layout");
_Static_assert(offsetof(RKLLMInput, prompt_input) == 16, "RKLLMInput union offset");
_Static_assert(sizeof(RKLLMInferParam) == 32, "RKLLMInferParam layout");
_Static_assert(sizeof(RKLLMPerfStat) == 20, "RKLLMPerfStat layout");
_Static_assert(sizeof(RKLLMResult) == 72, "RKLLMResult layout");
_Static_assert(sizeof(RKLLMCrossAttnParam) == 40, "RKLLMCrossAttnParam layout");
_Static_assert(sizeof(LLMCallState) == 4 && sizeof(bool) == 1, "enum and bool sizes");
#endif

#ifdef __cplusplus
}
#endif

#endif
