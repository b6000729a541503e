"""Images through the Python package, on the tiny Qwen3-VL fixture (testdata/synthetic/qwen3_vl,
random weights, with transformers' reference outputs) and the Qwen3 tokenizer of the repo."""

import json
import struct
from pathlib import Path

import pytest

import inference_pio as ip

ROOT = Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "testdata" / "synthetic" / "qwen3_vl"
TOKENIZER = ROOT / "crates" / "pio-model" / "tests" / "data" / "qwen3-tokenizer"
IMAGE = FIXTURE / "image.png"


def reference_ids(key):
    raw = (FIXTURE / "reference.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + n])[key]["data_offsets"]
    data = raw[8 + n + start : 8 + n + end]
    return [v for (v,) in struct.iter_unpack("<q", data)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # The fixture's files and a tokenizer, side by side as a Hugging Face directory.
    d = tmp_path_factory.mktemp("qwen3_vl")
    for f in list(FIXTURE.iterdir()) + list(TOKENIZER.iterdir()):
        (d / f.name).symlink_to(f)
    return d


@pytest.fixture(scope="module")
def llm(model_dir):
    # f32 cache and activations: the reference is transformers' f32 computation.
    llm = ip.LLM(model_dir, threads=2, cache_type_k="f32", cache_type_v="f32", bf16_activations=False,
                 max_model_len=256, kv_cache_mem="16MiB")
    yield llm
    llm.shutdown()


GREEDY16 = ip.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def test_an_image_prompt_gives_transformers_greedy_tokens(llm):
    prompt = {"prompt_token_ids": reference_ids("image_input_ids"), "multi_modal_data": {"image": [str(IMAGE)]}}
    out = llm.generate(prompt, GREEDY16)[0].outputs[0]
    assert out.token_ids == reference_ids("image_greedy_ids")
    # The same image as bytes, batched with a text-only prompt: each as alone.
    text_only = reference_ids("batch2_input_ids")
    alone = llm.generate([text_only], GREEDY16)[0].outputs[0].token_ids
    both = llm.generate(
        [dict(prompt, multi_modal_data={"image": [IMAGE.read_bytes()]}), text_only], GREEDY16
    )
    assert both[0].outputs[0].token_ids == out.token_ids
    assert both[1].outputs[0].token_ids == alone


def test_chat_image_parts_go_inline_whatever_their_source():
    # (The fixture's 512-token vocabulary cannot take the chat template's tokens, so chat itself
    # runs on the real models in the Rust tests; here: what the package sends the engine.)
    import base64

    want = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    for part in (
        {"type": "image_url", "image_url": {"url": f"file://{IMAGE}"}},
        {"type": "image_url", "image_url": {"url": str(IMAGE)}},
        {"type": "image_url", "image_url": {"url": want}},
        {"type": "image", "image": IMAGE.read_bytes()},
        {"type": "image", "image": IMAGE},
    ):
        sent = json.loads(ip._messages_json([{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}]))
        assert sent[0]["content"][0] == {"type": "image_url", "image_url": {"url": want}}, part
        assert sent[0]["content"][1] == {"type": "text", "text": "Hi"}


def test_bad_images_are_value_errors(llm, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(IMAGE.read_bytes()[:100])
    with pytest.raises(ValueError, match="image"):
        llm.generate({"prompt": "x", "multi_modal_data": {"image": [broken]}})
    with pytest.raises(ValueError, match="image"):
        llm.generate({"prompt": "x", "multi_modal_data": {"image": [tmp_path / "missing.png"]}})
    # More images than placeholders.
    ids = reference_ids("image_input_ids")
    with pytest.raises(ValueError):
        llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [IMAGE, IMAGE]}}, GREEDY16)
