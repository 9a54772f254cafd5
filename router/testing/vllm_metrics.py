"""A real vLLM OpenAI server's `/metrics` page, for tests and the micro-benchmark: what the
engine-stats parser meets in production."""

from __future__ import annotations

__all__ = ["LLAMA", "QWEN", "VLLM_METRICS"]

LLAMA = 'model_name="meta-llama/Llama-3.1-8B-Instruct"'
QWEN = 'model_name="Qwen/Qwen2.5-0.5B-Instruct"'

# What a vLLM 0.10 OpenAI server's `/metrics` looks like (prometheus_client text format, with
# prometheus-fastapi-instrumentator's http_* series), here with two model_name label sets and the
# deprecated `gpu_cache_usage_perc` shown next to its replacement. Histograms are added below.
VLLM_HEAD = f"""\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 18345.0
python_gc_objects_collected_total{{generation="1"}} 4012.0
python_gc_objects_collected_total{{generation="2"}} 1170.0
# HELP python_gc_objects_uncollectable_total Uncollectable objects found during GC
# TYPE python_gc_objects_uncollectable_total counter
python_gc_objects_uncollectable_total{{generation="0"}} 0.0
python_gc_objects_uncollectable_total{{generation="1"}} 0.0
python_gc_objects_uncollectable_total{{generation="2"}} 0.0
# HELP python_gc_collections_total Number of times this generation was collected
# TYPE python_gc_collections_total counter
python_gc_collections_total{{generation="0"}} 2208.0
python_gc_collections_total{{generation="1"}} 200.0
python_gc_collections_total{{generation="2"}} 13.0
# HELP python_info Python platform information
# TYPE python_info gauge
python_info{{implementation="CPython",major="3",minor="12",patchlevel="11",version="3.12.11"}} 1.0
# HELP process_virtual_memory_bytes Virtual memory size in bytes.
# TYPE process_virtual_memory_bytes gauge
process_virtual_memory_bytes 4.6119583744e+010
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 2.312908800e+09
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.75012345678e+09
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 812.46
# HELP process_open_fds Number of open file descriptors.
# TYPE process_open_fds gauge
process_open_fds 97.0
# HELP process_max_fds Maximum number of open file descriptors.
# TYPE process_max_fds gauge
process_max_fds 1.048576e+06
# HELP http_requests_total Total number of requests by method, status and handler.
# TYPE http_requests_total counter
http_requests_total{{handler="/v1/chat/completions",method="POST",status="2xx"}} 5120.0
http_requests_total{{handler="/metrics",method="GET",status="2xx"}} 861.0
http_requests_total{{handler="/health",method="GET",status="2xx"}} 861.0
http_requests_total{{handler="none",method="GET",status="4xx"}} 3.0
# HELP http_requests_created Total number of requests by method, status and handler.
# TYPE http_requests_created gauge
http_requests_created{{handler="/v1/chat/completions",method="POST",status="2xx"}} 1.75012e+09
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="16",cache_dtype="auto",calculate_kv_scales="False",\
enable_prefix_caching="True",gpu_memory_utilization="0.9",num_cpu_blocks="None",\
num_gpu_blocks="27353",prefix_caching_hash_algo="builtin",swap_space="4"}} 1.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{{max_lora="0",running_lora_adapters="",waiting_lora_adapters=""}} 1.75e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",{LLAMA}}} 12.0
vllm:num_requests_running{{engine="0",{QWEN}}} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",{LLAMA}}} 4.0
vllm:num_requests_waiting{{engine="0",{QWEN}}} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",{LLAMA}}} 0.5
vllm:kv_cache_usage_perc{{engine="0",{QWEN}}} 0.25
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{engine="0",{LLAMA}}} 0.99
vllm:gpu_cache_usage_perc{{engine="0",{QWEN}}} 0.99
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",{LLAMA}}} 800000.0
vllm:prefix_cache_queries_total{{engine="0",{QWEN}}} 200000.0
# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{{engine="0",{LLAMA}}} 1.7501234e+09
vllm:prefix_cache_queries_created{{engine="0",{QWEN}}} 1.7501234e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",{LLAMA}}} 600000.0
vllm:prefix_cache_hits_total{{engine="0",{QWEN}}} 50000.0
# HELP vllm:prefix_cache_hits_created Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_created gauge
vllm:prefix_cache_hits_created{{engine="0",{LLAMA}}} 1.7501234e+09
vllm:prefix_cache_hits_created{{engine="0",{QWEN}}} 1.7501234e+09
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{{engine="0",{LLAMA}}} 7.0
vllm:num_preemptions_total{{engine="0",{QWEN}}} 0.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",{LLAMA}}} 1.234567e+06
vllm:prompt_tokens_total{{engine="0",{QWEN}}} 250000.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",{LLAMA}}} 654321.0
vllm:generation_tokens_total{{engine="0",{QWEN}}} 120000.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",{LLAMA}}} 5000.0
vllm:request_success_total{{engine="0",finished_reason="length",{LLAMA}}} 97.0
vllm:request_success_total{{engine="0",finished_reason="abort",{LLAMA}}} 23.0
vllm:request_success_total{{engine="0",finished_reason="stop",{QWEN}}} 900.0
"""

TTFT_BUCKETS = ("0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5",
                "0.75", "1.0", "2.5", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "+Inf")
LATENCY_BUCKETS = ("0.3", "0.5", "0.8", "1.0", "1.5", "2.0", "2.5", "5.0", "10.0", "15.0",
                   "20.0", "30.0", "40.0", "50.0", "60.0", "+Inf")
TOKEN_BUCKETS = ("1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "200.0", "500.0", "1000.0",
                 "2000.0", "5000.0", "10000.0", "+Inf")


def histogram(name: str, help_text: str, buckets: tuple[str, ...]) -> str:
    """One vLLM histogram family, both model_name label sets, as prometheus_client prints it."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for model, scale in ((LLAMA, 5000), (QWEN, 900)):
        for n, le in enumerate(buckets, 1):
            count = scale * n // len(buckets)
            lines.append(f'{name}_bucket{{engine="0",le="{le}",{model}}} {float(count)}')
        lines.append(f'{name}_count{{engine="0",{model}}} {float(scale)}')
        lines.append(f'{name}_sum{{engine="0",{model}}} {scale * 0.37}')
    return "\n".join(lines) + "\n"


VLLM_METRICS = (
    VLLM_HEAD
    + histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                TTFT_BUCKETS)
    + histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                LATENCY_BUCKETS)
    + histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                TOKEN_BUCKETS)
)
