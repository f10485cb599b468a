"""Text embeddings from the runtime's last hidden layer: pooling, L2 normalisation, wire encodings.

librkllmrt 1.2.3 has no embedding call; RKLLM_INFER_GET_LAST_HIDDEN_LAYER hands over num_tokens x
embd_size float32 hidden states of the prompt. An embedding model is pooled the way it was trained:
Qwen3-Embedding-style models read the last token's state ("last"), others average every token
("mean"). Either way the vector is L2-normalised, as OpenAI's and Ollama's embeddings are.

Python floats only (numpy is not a dependency): array('f') holds the float32 rows.
"""

from __future__ import annotations

import base64
import math
import sys
from array import array
from typing import Literal

from rkllm_runtime.engine import HiddenStates
from rkllm_runtime.errors import RunError

Pooling = Literal["last", "mean"]


def embedding_only_message(model: str) -> str:
    """Why chat or completion on a model of kind "embedding" is refused, and what to call instead."""
    return (
        f"model {model} is an embedding model: it serves only POST /v1/embeddings (OpenAI) and "
        "POST /api/embed or /api/embeddings (Ollama); use a chat model for chat and completions"
    )


def _floats(data: bytes) -> array[float]:
    values = array("f")
    values.frombytes(data)
    return values


def pool(hidden: HiddenStates, pooling: Pooling) -> array[float]:
    """One embd_size vector from the token rows (not yet normalised)."""
    if pooling == "last":
        return _floats(hidden.row(hidden.num_tokens - 1))
    rows, size = _floats(hidden.data), hidden.embd_size
    count = hidden.num_tokens
    # rows[d::size] is column d (one value per token), sliced in C.
    return array("f", (math.fsum(rows[d::size]) / count for d in range(size)))


def l2_normalise(vector: array[float]) -> array[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    if not math.isfinite(norm) or norm == 0.0:
        # NaN or zeros mean the hidden states were not copied while they were valid, or are broken.
        raise RunError(f"the runtime's hidden states pool to a vector of norm {norm}; cannot normalise")
    return array("f", (x / norm for x in vector))


def embedding_vector(hidden: HiddenStates, pooling: Pooling) -> array[float]:
    return l2_normalise(pool(hidden, pooling))


def to_json_array(vector: array[float]) -> str:
    """The vector as a JSON array: 9 significant digits give every float32 back exactly, and format
    three times faster than json's 17-digit doubles (the cost that dominates a large answer)."""
    return "[" + ",".join(map("{:.9g}".format, vector)) + "]"


def to_base64(vector: array[float]) -> str:
    """Little-endian float32, as OpenAI's encoding_format="base64" carries it."""
    if sys.byteorder == "little":
        return base64.b64encode(vector.tobytes()).decode("ascii")
    swapped = array("f", vector)
    swapped.byteswap()
    return base64.b64encode(swapped.tobytes()).decode("ascii")


def from_base64(text: str) -> array[float]:
    values = _floats(base64.b64decode(text))
    if sys.byteorder != "little":
        values.byteswap()
    return values
