"""Stand-in for `rkllm.api.RKLLM`: appends every call (method and keyword arguments) as a JSON
line to $FAKE_RKLLM_TOOLKIT_RECORD and writes a small text file on export. A method named in
$FAKE_RKLLM_TOOLKIT_FAIL returns -1, like the real toolkit's failure status."""

import json
import os
from pathlib import Path


class RKLLM:
    def _record(self, method, arguments):
        with Path(os.environ["FAKE_RKLLM_TOOLKIT_RECORD"]).open("a", encoding="utf-8") as log:
            log.write(json.dumps({"method": method, "arguments": arguments}) + "\n")
        return -1 if os.environ.get("FAKE_RKLLM_TOOLKIT_FAIL") == method else 0

    def load_huggingface(self, model, model_lora=None, device="cpu", dtype="float32", custom_config=None,
                         load_weight=True):
        return self._record("load_huggingface", {"model": model, "model_lora": model_lora, "device": device})

    def build(self, do_quantization=True, optimization_level=1, quantized_dtype="w8a8",
              quantized_algorithm="normal", target_platform="rk3588", num_npu_core=3, extra_qparams=None,
              dataset=None, hybrid_rate=0, max_context=4096):
        return self._record("build", {
            "do_quantization": do_quantization, "optimization_level": optimization_level,
            "quantized_dtype": quantized_dtype, "quantized_algorithm": quantized_algorithm,
            "target_platform": target_platform, "num_npu_core": num_npu_core, "extra_qparams": extra_qparams,
            "dataset": dataset, "max_context": max_context,
        })

    def export_rkllm(self, export_path):
        status = self._record("export_rkllm", {"export_path": export_path})
        if status == 0:
            path = Path(export_path)
            path.write_text(f"# written by the fake RKLLM-Toolkit for {path.name}\n", encoding="utf-8")
        return status
