/*
 * Prints the layout of every struct in our rkllm.h, one block per struct, in the format of
 * reference-layout-1.2.3.txt, so a plain diff proves the header matches the 1.2.3 ABI on each
 * architecture we build for.
 */
#include <stdalign.h>
#include <stdio.h>

#include "rkllm.h"

#define STRUCT(type) printf("sizeof(%s) = %zu, alignof = %zu\n", #type, sizeof(type), alignof(type))
#define FIELD(type, field) \
    printf("  %-28s off %3zu size %3zu\n", #field, offsetof(type, field), sizeof(((type *)0)->field))

int main(void)
{
    STRUCT(RKLLMExtendParam);
    FIELD(RKLLMExtendParam, base_domain_id);
    FIELD(RKLLMExtendParam, embed_flash);
    FIELD(RKLLMExtendParam, enabled_cpus_num);
    FIELD(RKLLMExtendParam, enabled_cpus_mask);
    FIELD(RKLLMExtendParam, n_batch);
    FIELD(RKLLMExtendParam, use_cross_attn);
    FIELD(RKLLMExtendParam, reserved);

    STRUCT(RKLLMParam);
    FIELD(RKLLMParam, model_path);
    FIELD(RKLLMParam, max_context_len);
    FIELD(RKLLMParam, max_new_tokens);
    FIELD(RKLLMParam, top_k);
    FIELD(RKLLMParam, n_keep);
    FIELD(RKLLMParam, top_p);
    FIELD(RKLLMParam, temperature);
    FIELD(RKLLMParam, repeat_penalty);
    FIELD(RKLLMParam, frequency_penalty);
    FIELD(RKLLMParam, presence_penalty);
    FIELD(RKLLMParam, mirostat);
    FIELD(RKLLMParam, mirostat_tau);
    FIELD(RKLLMParam, mirostat_eta);
    FIELD(RKLLMParam, skip_special_token);
    FIELD(RKLLMParam, is_async);
    FIELD(RKLLMParam, img_start);
    FIELD(RKLLMParam, img_end);
    FIELD(RKLLMParam, img_content);
    FIELD(RKLLMParam, extend_param);

    STRUCT(RKLLMLoraAdapter);
    FIELD(RKLLMLoraAdapter, lora_adapter_path);
    FIELD(RKLLMLoraAdapter, lora_adapter_name);
    FIELD(RKLLMLoraAdapter, scale);

    STRUCT(RKLLMEmbedInput);
    FIELD(RKLLMEmbedInput, embed);
    FIELD(RKLLMEmbedInput, n_tokens);

    STRUCT(RKLLMTokenInput);
    FIELD(RKLLMTokenInput, input_ids);
    FIELD(RKLLMTokenInput, n_tokens);

    STRUCT(RKLLMMultiModalInput);
    FIELD(RKLLMMultiModalInput, prompt);
    FIELD(RKLLMMultiModalInput, image_embed);
    FIELD(RKLLMMultiModalInput, n_image_tokens);
    FIELD(RKLLMMultiModalInput, n_image);
    FIELD(RKLLMMultiModalInput, image_width);
    FIELD(RKLLMMultiModalInput, image_height);

    STRUCT(RKLLMInput);
    FIELD(RKLLMInput, role);
    FIELD(RKLLMInput, enable_thinking);
    FIELD(RKLLMInput, input_type);
    FIELD(RKLLMInput, prompt_input);
    FIELD(RKLLMInput, embed_input);
    FIELD(RKLLMInput, token_input);
    FIELD(RKLLMInput, multimodal_input);

    STRUCT(RKLLMLoraParam);
    FIELD(RKLLMLoraParam, lora_adapter_name);

    STRUCT(RKLLMPromptCacheParam);
    FIELD(RKLLMPromptCacheParam, save_prompt_cache);
    FIELD(RKLLMPromptCacheParam, prompt_cache_path);

    STRUCT(RKLLMCrossAttnParam);
    FIELD(RKLLMCrossAttnParam, encoder_k_cache);
    FIELD(RKLLMCrossAttnParam, encoder_v_cache);
    FIELD(RKLLMCrossAttnParam, encoder_mask);
    FIELD(RKLLMCrossAttnParam, encoder_pos);
    FIELD(RKLLMCrossAttnParam, num_tokens);

    STRUCT(RKLLMInferParam);
    FIELD(RKLLMInferParam, mode);
    FIELD(RKLLMInferParam, lora_params);
    FIELD(RKLLMInferParam, prompt_cache_params);
    FIELD(RKLLMInferParam, keep_history);

    STRUCT(RKLLMResultLastHiddenLayer);
    FIELD(RKLLMResultLastHiddenLayer, hidden_states);
    FIELD(RKLLMResultLastHiddenLayer, embd_size);
    FIELD(RKLLMResultLastHiddenLayer, num_tokens);

    STRUCT(RKLLMResultLogits);
    FIELD(RKLLMResultLogits, logits);
    FIELD(RKLLMResultLogits, vocab_size);
    FIELD(RKLLMResultLogits, num_tokens);

    STRUCT(RKLLMPerfStat);
    FIELD(RKLLMPerfStat, prefill_time_ms);
    FIELD(RKLLMPerfStat, prefill_tokens);
    FIELD(RKLLMPerfStat, generate_time_ms);
    FIELD(RKLLMPerfStat, generate_tokens);
    FIELD(RKLLMPerfStat, memory_usage_mb);

    STRUCT(RKLLMResult);
    FIELD(RKLLMResult, text);
    FIELD(RKLLMResult, token_id);
    FIELD(RKLLMResult, last_hidden_layer);
    FIELD(RKLLMResult, logits);
    FIELD(RKLLMResult, perf);

    printf("sizeof(enum LLMCallState)=%zu sizeof(bool)=%zu\n", sizeof(LLMCallState), sizeof(bool));
    return 0;
}
