"""Type stubs of the native module (the Rust engine). Use the package's ``LLM`` and plugins."""

from os import PathLike
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

simd_level: str

class InferencePIOError(Exception):
    """The engine failed: a model that does not load, an unloaded model, a stopped engine."""

class Stream:
    """A request's steps as they come (dicts as ``Engine.complete`` returns)."""

    prompt_token_ids: List[int]
    def __iter__(self) -> Iterator[Dict[str, Any]]: ...
    def __next__(self) -> Dict[str, Any]: ...
    def collect(self) -> Dict[str, Any]: ...
    def close(self) -> None: ...

class Engine:
    """A model loaded behind its engine."""

    def __init__(
        self,
        path: Union[str, PathLike],
        *,
        quant: Optional[str] = None,
        threads: Optional[int] = None,
        kv_cache_bytes: Optional[int] = None,
        cache_type_k: Optional[str] = None,
        cache_type_v: Optional[str] = None,
        max_model_len: Optional[int] = None,
        max_num_seqs: int = 16,
        mmproj: Union[None, str, PathLike] = None,
        repack: bool = True,
        bf16_activations: bool = True,
        max_memory: Optional[int] = None,
        spec_method: Optional[str] = None,
        spec_tokens: int = 8,
        spec_ngram: int = 5,
        spec_ngram_min: int = 3,
    ) -> None: ...
    def complete(
        self,
        *,
        prompt_token_ids: Optional[Sequence[int]] = None,
        prompt: Optional[str] = None,
        messages_json: Optional[str] = None,
        images: Sequence[bytes] = ...,
        params: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]: ...
    def stream(
        self,
        *,
        prompt_token_ids: Optional[Sequence[int]] = None,
        prompt: Optional[str] = None,
        messages_json: Optional[str] = None,
        images: Sequence[bytes] = ...,
        params: Optional[Dict[str, Any]] = None,
    ) -> Stream: ...
    def tokenize(self, text: str) -> List[int]: ...
    def detokenize(self, ids: Sequence[int]) -> str: ...
    def defaults(self) -> Dict[str, Any]: ...
    def report(self) -> Dict[str, Any]: ...
    def unload(self) -> None: ...
    @property
    def loaded(self) -> bool: ...
