"""Captioning paths the main test file leaves out: weight resolution and cache keys, device and
dtype choice, generation settings against HF, other OPT / T5 language models, OOM and bad
input accounting, cache files, stage lifecycle. Tiny random-init models, offline."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ccurate.captioning.blip2 import (
    Blip2Captioner,
    _image_size,
    decoding_tag,
    load_image,
    pick_device,
    pick_dtype,
    resolve_weights,
)
from ccurate.captioning.cache import CACHE_SCHEMA, CaptionCache
from ccurate.captioning.config import CaptionConfig
from ccurate.captioning.fastgen import GreedyOPT, supports
from ccurate.captioning.stage import CaptionStage
from ccurate.captioning.tiny import build_processor, build_tiny_blip2, build_tokenizer
from ccurate.pixels import jpeg_size
from ccurate.weights import WeightsNotFoundError
from tests.test_captioning import (  # noqa: F401 - the autouse fixture applies here too
    Counter,
    _offline_single_thread,
    attached,
    jpeg,
    load_bench,
    samples,
)
from tests.test_captioning import tiny_dir as tiny_dir  # a fixture

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def captioner(tiny_dir: Path) -> Iterator[Blip2Captioner]:
    cap = Blip2Captioner.load(CaptionConfig(model=str(tiny_dir), batch_size=8, max_new_tokens=8))
    yield cap
    cap.close()


def fake_weights(path: Path, config: str = "{}") -> Path:
    """A directory `resolve_weights` accepts (config, safetensors, processor and tokenizer
    files); not loadable."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(config)
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "processor_config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    return path


def hf_download_metadata(d: Path, commit: str = COMMIT) -> None:
    """What `hf download --local-dir d` leaves beside the files: per file its commit, its
    etag (SHA-256 for LFS files such as the weights, the git object id for the others) and
    the download time."""
    meta = d / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True, exist_ok=True)
    for f in d.iterdir():
        if not f.is_file():
            continue
        data = f.read_bytes()
        if f.suffix == ".safetensors":
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (meta / f"{f.name}.metadata").write_text(f"{commit}\n{etag}\n1700000000.0\n")


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, hub: Path) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))


def variant(cap: Blip2Captioner, **update: Any) -> Blip2Captioner:
    """Another captioner over the same loaded model with other decoding settings."""
    return Blip2Captioner(cap.model, cap.processor, cap.cfg.model_copy(update=update), "t", "r")


def decoded(cap: Blip2Captioner, images: list[bytes]) -> list[np.ndarray]:
    arrs = [load_image(d, cap.height, cap.width, cap.resample) for d in images]
    assert all(a is not None for a in arrs)
    return [a for a in arrs if a is not None]


def pixels(cap: Blip2Captioner, images: list[bytes]) -> torch.Tensor:
    """The normalised pixel batch the captioner feeds its vision encoder."""
    arrs = torch.from_numpy(np.stack(decoded(cap, images)))
    return arrs.permute(0, 3, 1, 2).float() * cap._scale - cap._shift


# ---- weights: where they are, what they are called, the cache key ---------------------


def test_no_model_is_a_value_error():
    with pytest.raises(ValueError, match="no caption model"):
        resolve_weights(CaptionConfig())


def test_model_id_of_a_local_directory(tmp_path):
    """[caption] model_id wins; else the hub id the config was saved from; else the dir name."""
    d = fake_weights(tmp_path / "ft", json.dumps({"_name_or_path": "acme/blip2-ft"}))
    assert resolve_weights(CaptionConfig(model=str(d))).model_id == "acme/blip2-ft"
    named = CaptionConfig(model=str(d), model_id="Salesforce/blip2-opt-2.7b")
    assert resolve_weights(named).model_id == "Salesforce/blip2-opt-2.7b"
    # a local path recorded as _name_or_path is no hub id
    local = fake_weights(tmp_path / "mine", json.dumps({"_name_or_path": str(d)}))
    assert resolve_weights(CaptionConfig(model=str(local))).model_id == "mine"
    broken = fake_weights(tmp_path / "broken", "{not json")
    w = resolve_weights(CaptionConfig(model=str(broken)))
    assert w.model_id == "broken" and w.revision.startswith("local-")


def test_hf_download_local_dir_records_its_commit(tmp_path):
    """`hf download --local-dir` leaves the commit in .cache metadata: that is the revision,
    while every model file holds the bytes its etag names."""
    d = fake_weights(tmp_path / "dl")
    hf_download_metadata(d)
    assert resolve_weights(CaptionConfig(model=str(d))).revision == COMMIT
    meta = d / ".cache" / "huggingface" / "download"
    (meta / "config.json.metadata").write_text("garbage\n")
    assert resolve_weights(CaptionConfig(model=str(d))).revision.startswith("local-")
    hf_download_metadata(d, commit="f" * 40)
    (meta / "tokenizer.json.metadata").write_text(
        (meta / "tokenizer.json.metadata").read_text().replace("f" * 40, COMMIT)
    )
    assert resolve_weights(CaptionConfig(model=str(d))).revision.startswith("local-")  # mixed
    hf_download_metadata(d)
    (d / "generation_config.json").write_text("{}")  # added by hand: no metadata
    assert resolve_weights(CaptionConfig(model=str(d))).revision.startswith("local-")


def test_local_revision_follows_content_not_sizes_or_paths(tiny_dir, tmp_path):
    """A retrained model in the same folder is a new cache key; a copy of it is the same key.

    Two seeds of the same architecture give weight files of identical size, so a key from
    names and sizes alone would serve the old model's cached captions for the new one.
    """
    a = shutil.copytree(tiny_dir, tmp_path / "a")  # seed 0
    b = build_tiny_blip2(tmp_path / "b", seed=1)
    size = (a / "model.safetensors").stat().st_size
    assert size == (b / "model.safetensors").stat().st_size

    def rev(d: Path) -> str:
        return resolve_weights(CaptionConfig(model=str(d))).revision

    rev_a, rev_b = rev(a), rev(b)
    assert rev_a != rev_b
    assert rev(shutil.copytree(a, tmp_path / "elsewhere")) == rev_a  # another node's copy
    shutil.copyfile(b / "model.safetensors", a / "model.safetensors")  # retrained in place
    assert rev(a) == rev_b
    gen = json.loads((a / "generation_config.json").read_text())
    gen["eos_token_id"] = 5  # decoding changes with it
    (a / "generation_config.json").write_text(json.dumps(gen))
    assert rev(a) not in {rev_a, rev_b}


def test_cached_snapshot_without_weights_says_how_to_fetch(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--blip2-cfg-only"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    use_hub_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights(CaptionConfig(model="acme/blip2-cfg-only"))
    assert str(snap) in str(err.value) and "hf download acme/blip2-cfg-only" in str(err.value)


def test_missing_relative_dir_names_the_local_path_too(tmp_path, monkeypatch):
    """A spec like weights/blip2 is a hub id and a folder: the error names both places."""
    use_hub_cache(monkeypatch, tmp_path / "hub")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights(CaptionConfig(model="weights/blip2", local_files_only=True))
    msg = str(err.value)
    assert str(tmp_path / "weights" / "blip2") in msg
    assert str(tmp_path / "hub" / "models--weights--blip2") in msg


# ---- device and dtype -----------------------------------------------------------------


def test_pick_device_explicit_and_without_cuda(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        pick_device("cuda")


def test_pick_device_spreads_workers_over_gpus(monkeypatch):
    """One GPU per worker: LOCAL_RANK first, else the pool worker's number, modulo the GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    proc = multiprocessing.current_process()
    monkeypatch.setattr(proc, "_identity", ())
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pick_device("auto") == torch.device("cuda", 0)  # the main process
    monkeypatch.setattr(proc, "_identity", (3,))  # the third pool worker
    assert pick_device("cuda") == torch.device("cuda", 2)
    monkeypatch.setattr(proc, "_identity", (6,))
    assert pick_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "7")
    assert pick_device("auto") == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "")  # set but empty: ignored
    assert pick_device("auto") == torch.device("cuda", 1)


def test_pick_dtype(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert pick_dtype("float16", cpu) is torch.float16
    assert pick_dtype("bfloat16", cuda) is torch.bfloat16
    assert pick_dtype("float32", cuda) is torch.float32
    assert pick_dtype("auto", cpu) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert pick_dtype("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # V100, T4
    assert pick_dtype("auto", cuda) is torch.float16


def test_load_in_float16_puts_every_module_in_it(tiny_dir):
    """HF keeps the Q-Former in fp32 under float16; the loader casts all of it (one dtype on
    tensor cores, as LAVIS runs it under fp16 autocast)."""
    cfg = CaptionConfig(model=str(tiny_dir), dtype="float16", batch_size=2, max_new_tokens=4)
    cap = Blip2Captioner.load(cfg)
    try:
        assert cap.dtype is torch.float16
        assert {p.dtype for p in cap.model.parameters()} == {torch.float16}
        caps = cap.caption([jpeg(1), jpeg(2)])
        assert all(c and c[0] for c in caps)
    finally:
        cap.close()


def test_stage_resources_follow_the_device(monkeypatch):
    """Ray schedules on these: a CPU-only config must not ask for a GPU, a CUDA one must."""
    assert CaptionStage(CaptionConfig(model="m", device="cpu")).resources.gpus == 0
    res = CaptionStage(CaptionConfig(model="m", device="cuda:1", decode_workers=6)).resources
    assert (res.gpus, res.cpus) == (1.0, 6.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert CaptionStage(CaptionConfig(model="m")).resources.gpus == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert CaptionStage(CaptionConfig(model="m")).resources.gpus == 1.0


def opt_2_7b_like(cfg: CaptionConfig, free_gb: float, monkeypatch) -> int:
    """`_auto_batch_size` for BLIP-2 OPT-2.7b (its config only) on a faked CUDA device."""
    mc = load_bench().full_blip2_opt27b_config()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(free_gb * 2**30), 0))
    fake = SimpleNamespace(
        cfg=cfg,
        device=torch.device("cuda", 0),
        model=SimpleNamespace(config=mc),
        dtype=torch.float16,
        prompt_ids=torch.zeros(32 + 4, dtype=torch.long),  # 32 query slots + "</s>a photo of"
    )
    size: int = Blip2Captioner._auto_batch_size(fake)  # type: ignore[arg-type]
    return size


def test_auto_batch_size_fits_free_memory(monkeypatch):
    """Powers of two, capped, growing with free memory, shrinking with beams.

    Scale check: the fp16 KV cache alone is 2 * 32 layers * ~66 positions * 2560 * 2 B
    = ~22 MB per image, so 70% of 8 GiB holds at most ~260 images (<= 256); the other
    terms (ViT activations, prefill, logits) are smaller than the cache, so >= 64. A unit
    slip (bits for bytes, GiB for bytes) lands far outside.
    """
    greedy = CaptionConfig()
    sizes = [opt_2_7b_like(greedy, gb, monkeypatch) for gb in (0.01, 1, 8, 40, 140)]
    assert all(s & (s - 1) == 0 for s in sizes)  # powers of two
    assert sizes == sorted(sizes)
    assert sizes[0] == 1  # nothing fits: still one image (OOM back-off takes over)
    assert 64 <= sizes[2] <= 256
    assert sizes[-1] == greedy.max_batch_size
    assert opt_2_7b_like(CaptionConfig(max_batch_size=100), 140, monkeypatch) == 64
    beams = CaptionConfig(num_beams=5)
    assert opt_2_7b_like(beams, 8, monkeypatch) < sizes[2]


# ---- image bytes ----------------------------------------------------------------------


def test_jpeg_size_fill_bytes_and_missing_frame_header():
    data = jpeg(0, w=64, h=48)
    assert jpeg_size(data) == (64, 48)
    # any number of 0xFF fill bytes may precede a marker (ITU T.81 B.1.1.2)
    assert jpeg_size(data[:2] + b"\xff\xff\xff" + data[2:]) == (64, 48)
    app0_len = int.from_bytes(data[4:6], "big")
    assert jpeg_size(data[: 4 + app0_len]) is None  # cut after APP0: no frame header
    assert jpeg_size(b"\x89PNG\r\n\x1a\n" + bytes(32)) is None


@pytest.mark.parametrize("fmt", ["TGA", "ICO"])
def test_formats_opencv_cannot_read_go_through_pil(fmt):
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    ours = load_image(buf.getvalue(), 32, 32, 3)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        ref = np.asarray(im.convert("RGB").resize((32, 32), 3))
    assert ours is not None and ours.shape == (32, 32, 3)
    assert np.abs(ours.astype(int) - ref).max() <= 1


def test_image_size_from_processor_configs():
    assert _image_size(224) == (224, 224)
    assert _image_size({"height": 224, "width": 160}) == (224, 160)
    assert _image_size({"shortest_edge": 384}) == (384, 384)
    assert _image_size(SimpleNamespace(height=32, width=48)) == (32, 48)  # SizeDict-like
    with pytest.raises(ValueError, match="unsupported image processor size"):
        _image_size({"longest_edge": 512})


# ---- generation settings --------------------------------------------------------------


def hf_blip2_texts(cap: Blip2Captioner, images: list[bytes]) -> list[str]:
    """Captions from HF's own `Blip2ForConditionalGeneration.generate`, prompt from the processor.

    Same pixels as ours (the resize is tested elsewhere), so this checks the prompt layout
    (image slots, BOS, text), the Q-Former wiring and the decode loop end to end.
    """
    prompt = cap.cfg.prompt
    blank = [Image.new("RGB", (8, 8))] * len(images)
    ids = cap.processor(images=blank, text=[prompt] * len(images), return_tensors="pt")
    with torch.inference_mode():
        out = cap.model.generate(
            pixel_values=pixels(cap, images),
            input_ids=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            max_new_tokens=cap.cfg.max_new_tokens,
            min_new_tokens=cap.cfg.min_new_tokens,
            do_sample=False,
        )
    if cap.decoder_only:
        out = out[:, ids["input_ids"].shape[1] :]
    return [t.strip() for t in cap.tokenizer.batch_decode(out, skip_special_tokens=True)]


def test_captions_match_hf_blip2_generate(captioner):
    imgs = [jpeg(i) for i in range(6)]
    ref = hf_blip2_texts(captioner, imgs)
    slow = variant(captioner, fast_decode=False)
    try:
        assert [c[0] if c else None for c in captioner.caption(imgs)] == ref
        assert [c[0] if c else None for c in slow.caption(imgs)] == ref
    finally:
        slow.close()
    assert len(set(ref)) > 1


def tiny_t5_blip2() -> tuple[Any, Any]:
    """BLIP-2 with a toy Flan-T5 language model (encoder-decoder) + the toy processor."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

    from ccurate.captioning.tiny import tiny_blip2_config

    processor: Any = build_processor(image_size=32, num_query_tokens=8)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    opt: Any = tiny_blip2_config(len(processor.tokenizer), image_token)
    t5_args: dict[str, Any] = dict(  # decoder_start_token_id: not in mypy's view of T5Config
        vocab_size=len(processor.tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=1,
        pad_token_id=1,
        eos_token_id=2,
        initializer_factor=4.0,
    )
    t5 = T5Config(**t5_args)
    cfg = Blip2Config(
        vision_config=opt.vision_config.to_dict(),
        qformer_config=opt.qformer_config.to_dict(),
        text_config=t5.to_dict(),
        num_query_tokens=8,
        image_token_index=image_token,
    )
    torch.manual_seed(0)
    return Blip2ForConditionalGeneration(cfg).eval(), processor


def test_flan_t5_blip2_captions_through_hf_generate():
    """The flan-t5 checkpoints: no fast path, encoder-decoder generate, same captions as HF."""
    model, processor = tiny_t5_blip2()
    assert not supports(model)
    cap = Blip2Captioner(model, processor, CaptionConfig(batch_size=4, max_new_tokens=8), "t5", "r")
    try:
        assert cap.fast is None and not cap.decoder_only
        imgs = [jpeg(i) for i in range(4)]
        ours = cap.caption(imgs)
        assert [c[0] if c else None for c in ours] == hf_blip2_texts(cap, imgs)
        assert len({c[0] for c in ours if c}) > 1
    finally:
        cap.close()


def test_checkpoint_eos_is_used_by_both_decode_paths(captioner, tiny_dir, tmp_path):
    """EOS comes from the checkpoint's generation_config.json, whichever path decodes.

    HF's language model keeps its own generation config (EOS from the text config): not
    told the checkpoint's EOS, the HF path (beams, sampling, fast_decode = false) let it
    through before min_new_tokens and cut there, so its captions differed from the fast
    path's for the same settings.
    """
    imgs = [jpeg(i) for i in range(8)]
    with torch.inference_mode():
        emb = captioner.encode(captioner._stack(decoded(captioner, imgs)))
        tokens = captioner.fast.generate(emb, captioner.prompt_ids, 2)
    first = int(torch.mode(tokens[:, 0]).values)  # what most images start with
    d = shutil.copytree(tiny_dir, tmp_path / "eos")
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = first
    (d / "generation_config.json").write_text(json.dumps(gen))
    cfg = CaptionConfig(model=str(d), batch_size=8, max_new_tokens=6, min_new_tokens=2)
    fast = Blip2Captioner.load(cfg)
    slow = variant(fast, fast_decode=False)
    try:
        assert fast.eos_ids == [first] and fast.fast is not None and slow.fast is None
        a, b = fast.caption(imgs), slow.caption(imgs)
        assert a == b
        assert all(c and c[0] for c in a)  # min_new_tokens held the EOS back
    finally:
        fast.close()
        slow.close()


def test_sampling_settings_reach_generate_and_reruns_repeat(captioner):
    """top_p and temperature are passed (each alone collapses sampling to greedy), and a
    rerun with the same seed gives the same captions."""
    imgs = [jpeg(i) for i in range(4)]
    greedy = [c[0] for c in captioner.caption(imgs) if c]
    caps = {}
    for name, upd in {
        "free": {"temperature": 2.0},
        "free_again": {"temperature": 2.0},
        "other_seed": {"temperature": 2.0, "seed": 1},
        "tiny_top_p": {"temperature": 2.0, "top_p": 1e-6},
        "cold": {"temperature": 1e-4},
    }.items():
        cap = variant(captioner, do_sample=True, num_captions=2, **{"top_p": 1.0, **upd})
        try:
            caps[name] = cap.caption(imgs)
        finally:
            cap.close()
    assert all(len(c) == 2 for c in caps["free"] if c is not None)
    assert caps["free"] == caps["free_again"]
    assert caps["free"] != caps["other_seed"]
    assert [c[0] for c in caps["free"] if c] != greedy
    for name in ("tiny_top_p", "cold"):
        assert [c for pair in caps[name] if pair for c in pair] == [g for g in greedy for _ in "ab"]


def test_length_penalty_is_in_the_cache_key_only_for_beam_search():
    beam = CaptionConfig(num_beams=4, length_penalty=0.6)
    assert decoding_tag(beam).startswith("beam4|lp0.6|")
    assert decoding_tag(CaptionConfig(num_beams=4)).startswith("beam4|max")
    # greedy decoding ignores it: the same captions must keep the same cache key
    assert decoding_tag(CaptionConfig(length_penalty=0.6)) == decoding_tag(CaptionConfig())


def test_image_token_missing_from_config_comes_from_the_tokenizer(captioner):
    """Configs saved before `image_token_index` existed: the processor's <image> token."""
    cfg = captioner.model.config
    old = cfg.image_token_index
    cfg.image_token_index = None
    try:
        cap = variant(captioner)
    finally:
        cfg.image_token_index = old
    try:
        assert torch.equal(cap.prompt_ids, captioner.prompt_ids)
        assert cap.image_pos.tolist() == list(range(cfg.num_query_tokens))
    finally:
        cap.close()


# ---- the fast decoder: other OPT shapes, its fallbacks ----------------------------------


def opt_lm(**kw: Any) -> Any:
    from transformers import OPTConfig, OPTForCausalLM

    base: dict[str, Any] = {
        "vocab_size": 48,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "ffn_dim": 64,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "word_embed_proj_dim": 32,
        "init_std": 0.5,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
    }
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize(
    "shape",
    [
        # OPT-350m: post-LN, no final LN, 512-d embeddings projected to 1024, here gelu
        {"do_layer_norm_before": False, "word_embed_proj_dim": 16, "activation_function": "gelu"},
        {"enable_bias": False},  # no biases anywhere
    ],
)
def test_fast_greedy_matches_hf_on_other_opt_shapes(shape):
    lm = opt_lm(**shape)
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 48, (6, 7)))
    with torch.inference_mode():
        emb = lm.get_input_embeddings()(ids)
        probe = GreedyOPT(lm, [], 1).generate(emb, ids, 8)
        eos = int(torch.mode(probe[:, 2:].flatten()).values)
        ours = GreedyOPT(lm, [eos], 1).generate(emb, ids, 8, 1, 1.2)
        ref = lm.generate(
            inputs_embeds=emb,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            min_new_tokens=1,
            repetition_penalty=1.2,
            eos_token_id=eos,
            pad_token_id=1,
            do_sample=False,
        )[:, ids.shape[1] :]
    ref = torch.nn.functional.pad(ref, (0, 8 - ref.shape[1]), value=1)
    assert torch.equal(ours, ref)
    assert len(set(ours[:, 0].tolist())) > 1


def test_supports_only_plain_opt_decoders(captioner):
    assert supports(captioner.model)
    assert not supports(SimpleNamespace())  # no language model
    enc_dec = SimpleNamespace(config=SimpleNamespace(model_type="opt", is_encoder_decoder=True))
    assert not supports(SimpleNamespace(language_model=enc_dec))
    odd = SimpleNamespace(config=SimpleNamespace(model_type="opt"), model=SimpleNamespace())
    assert not supports(SimpleNamespace(language_model=odd))  # not the OPT module layout


def test_generation_fields_fast_path_lacks_fall_back_to_hf(captioner):
    """A field of the language model's generation config (what HF `generate` applies) the
    fast path lacks: decode through HF."""
    gen = captioner.model.language_model.generation_config
    gen.no_repeat_ngram_size = 2
    try:
        assert not supports(captioner.model)
        cap = variant(captioner)
        try:
            assert cap.fast is None
        finally:
            cap.close()
    finally:
        gen.no_repeat_ngram_size = None
    assert supports(captioner.model)


def test_cuda_graph_capture_failure_decodes_eagerly(captioner, caplog):
    """A driver that cannot capture: warn once, decode eagerly, same tokens; OOM propagates."""
    lm = captioner.model.language_model
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), np.uint8))
    with torch.inference_mode():
        emb = captioner.encode(x)
    eager = GreedyOPT(lm, captioner.eos_ids, captioner.pad_id, use_graphs=False)
    ref = eager.generate(emb, captioner.prompt_ids, 6)
    flaky = GreedyOPT(lm, captioner.eos_ids, captioner.pad_id)
    flaky.use_graphs = True  # as on a GPU; capture fails here (no CUDA stream on CPU)
    caplog.set_level(logging.WARNING, logger="ccurate.captioning")
    assert torch.equal(flaky.generate(emb, captioner.prompt_ids, 6), ref)
    assert not flaky.use_graphs
    assert torch.equal(flaky.generate(emb, captioner.prompt_ids, 6), ref)
    assert sum("graph capture failed" in r.getMessage() for r in caplog.records) == 1

    def oom(*a: Any, **k: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    tight = GreedyOPT(lm, captioner.eos_ids, captioner.pad_id)
    tight.use_graphs = True
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "Stream", oom)
        with pytest.raises(torch.cuda.OutOfMemoryError):  # the caller halves the batch
            tight.generate(emb, captioner.prompt_ids, 6)


# ---- batches: OOM, errors, undecodable images -------------------------------------------


def test_oom_as_runtime_error_halves_and_counts_bad_images_once(captioner):
    """Allocators that raise a plain RuntimeError("... out of memory") are OOMs too; an
    undecodable image in a retried batch is one failure, not one per retry."""
    counter = Counter(captioner)
    old, failed = captioner.batch_size, captioner.failed

    def gen(embeds: torch.Tensor) -> list[list[str]]:
        if embeds.shape[0] > 2:
            counter.sizes.append(int(embeds.shape[0]))
            raise RuntimeError("CUDA error: out of memory")
        return counter(embeds)

    captioner.generate = gen
    try:
        images: list[bytes | None] = [jpeg(i) for i in range(8)]
        images[1] = b"\xff\xd8 not a jpeg"
        caps = captioner.caption(images)
        assert caps[1] is None and all(c and c[0] for i, c in enumerate(caps) if i != 1)
        assert captioner.batch_size == 2 and counter.sizes[:2] == [7, 3]
        assert captioner.failed - failed == 1
    finally:
        del captioner.generate
        captioner.batch_size = old


def test_other_errors_are_not_mistaken_for_oom(captioner):
    def broken(embeds: torch.Tensor) -> list[list[str]]:
        raise RuntimeError("CUDA error: device-side assert triggered")

    old = captioner.batch_size
    captioner.generate = broken
    try:
        with pytest.raises(RuntimeError, match="device-side assert"):
            captioner.caption([jpeg(1), jpeg(2)])
        assert captioner.batch_size == old  # no back-off for a real bug
    finally:
        del captioner.generate


def test_batch_of_only_bad_images_runs_no_model(captioner):
    counter = Counter(captioner)
    captioner.generate = counter
    failed = captioner.failed
    try:
        assert captioner.caption([b"junk", None, b"\x89PNG broken"]) == [None] * 3
        assert counter.sizes == []
        assert captioner.failed - failed == 3  # each is left without a caption
    finally:
        del captioner.generate


# ---- the cache --------------------------------------------------------------------------


def test_cache_skips_unreadable_parts_and_empty_rows(tmp_path, caplog):
    cache = CaptionCache(tmp_path, "m@r|greedy")
    cache.put("a" * 64, ["a dog"])
    cache.put("b" * 64, [])  # nothing to reuse: must be captioned again
    cache.close()
    (tmp_path / "part-0-junk.parquet").write_bytes(b"PAR1 not parquet")
    pq.write_table(pa.table({"other": [1, 2]}), tmp_path / "part-1-foreign.parquet")
    caplog.set_level(logging.WARNING, logger="ccurate.captioning")
    again = CaptionCache(tmp_path, "m@r|greedy")
    assert again.load() == 1 and len(again) == 1
    assert again.get("a" * 64) == ["a dog"] and again.get("b" * 64) is None
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(skipped) == 2 and any("junk" in m for m in skipped)
    again.close()


def test_cache_flushes_every_flush_rows_and_not_when_empty(tmp_path):
    cache = CaptionCache(tmp_path, "m", flush_rows=2)
    cache.load()
    assert cache.flush() is None and not list(tmp_path.glob("*.parquet"))
    for i in range(5):
        cache.put(f"{i:064x}", [f"cap {i}"])
    assert len(list(tmp_path.glob("*.parquet"))) == 2  # rows 0-1 and 2-3; row 4 waits
    other = CaptionCache(tmp_path, "m")
    assert other.load() == 4  # what another worker (or a rerun) sees
    other.close()
    cache.close()
    assert len(list(tmp_path.glob("*.parquet"))) == 3
    table = pq.read_table(tmp_path)
    assert table.column_names == CACHE_SCHEMA.names and table.num_rows == 5


# ---- the stage: lifecycle, resume, invalidation -----------------------------------------


def test_process_before_setup_is_an_error(tiny_dir):
    with pytest.raises(RuntimeError, match="setup"):
        CaptionStage(CaptionConfig(model=str(tiny_dir))).process(samples(1))


def test_stage_loads_closes_and_reloads_the_same_captions(tiny_dir):
    """A worker's own model is closed at teardown; a fresh setup (next run) captions alike."""
    cfg = CaptionConfig(model=str(tiny_dir), batch_size=4, max_new_tokens=6)
    stage = CaptionStage(cfg)
    stage.setup()
    first = stage._captioner
    out1 = [s.caption for s in stage.process(samples(3))]
    stage.teardown()
    assert stage._captioner is None
    with pytest.raises(RuntimeError):  # its decode threads are gone
        first._pool.submit(int)
    stage.setup()
    try:
        assert stage._captioner is not first
        assert [s.caption for s in stage.process(samples(3))] == out1
        assert all(out1)
    finally:
        stage.teardown()


def test_killed_worker_resumes_from_flushed_cache_rows(captioner, tiny_dir, tmp_path):
    """Rows flushed every cache_flush_rows survive a kill; only the rest is recaptioned."""
    cfg = CaptionConfig(
        model=str(tiny_dir), cache_dir=str(tmp_path / "cc"), cache_flush_rows=2, max_new_tokens=8
    )
    counter = Counter(captioner)
    captioner.generate = counter
    try:
        killed = attached(cfg, captioner)
        out1 = killed.process(samples(5))
        killed._cache._pending.clear()  # the kill: row 5 was never written
        killed._cache.close()

        resumed = attached(cfg, captioner)
        out2 = resumed.process(samples(5))
        resumed.teardown()
    finally:
        del captioner.generate
    assert counter.sizes == [5, 1]
    assert resumed.counts["cache_hits"] == 4 and resumed.counts["captioned"] == 1
    assert [s.caption for s in out2] == [s.caption for s in out1]


def test_other_decoding_settings_do_not_reuse_cached_captions(captioner, tiny_dir, tmp_path):
    cache_dir = tmp_path / "cc"
    sizes = []
    for max_new in (8, 8, 4):
        cfg = CaptionConfig(model=str(tiny_dir), cache_dir=str(cache_dir), max_new_tokens=max_new)
        cap = variant(captioner, max_new_tokens=max_new)
        counter = Counter(cap)
        cap.generate = counter  # type: ignore[method-assign]
        stage = attached(cfg, cap)
        out = stage.process(samples(3))
        stage.teardown()
        cap.close()
        assert all(s.caption_model == cap.tag for s in out)
        sizes.append(counter.sizes)
    assert sizes == [[3], [], [3]]  # the rerun of max8 hit the cache; max4 is another key
    rows = pq.read_table(cache_dir).column("caption_model").to_pylist()
    assert len(rows) == 6 and len(set(rows)) == 2


# ---- the toy tokenizer ------------------------------------------------------------------


def test_padded_tiny_tokenizer_decodes_every_id():
    """The benchmark pads to OPT's vocabulary: every id a random model emits must be text."""
    plain: Any = build_tokenizer()
    padded: Any = build_tokenizer(vocab_size=80)
    assert len(padded) == 80 > len(plain)
    assert padded.convert_tokens_to_ids("dog") == plain.convert_tokens_to_ids("dog")
    words = [padded.decode([i], skip_special_tokens=True) for i in range(4, 80)]
    assert all(w.strip() for w in words) and len(set(words)) == 76
    assert padded("a dog")["input_ids"][0] == 2  # "</s>" still leads, as in OPT


# ---- on a GPU: CUDA graphs and the OOM path's cache release ------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_matches_hf(tiny_dir):
    """Graph replay (one masked graph, or one per position) gives HF's greedy tokens."""
    cfg = CaptionConfig(
        model=str(tiny_dir), device="cuda", dtype="float32", batch_size=8, max_new_tokens=8
    )
    cap = Blip2Captioner.load(cfg)
    slow = variant(cap, fast_decode=False)
    imgs = [jpeg(i) for i in range(8)]
    try:
        assert cap.fast is not None and cap.fast.use_graphs
        assert cap.caption(imgs) == slow.caption(imgs)
        assert any(st.graphs for st in cap.fast._states.values())  # replayed, not eager
        lm = cap.model.language_model
        with torch.inference_mode():
            emb = cap.encode(cap._stack(decoded(cap, imgs)))
            ref = lm.generate(
                inputs_embeds=emb,
                input_ids=cap.prompt_ids.unsqueeze(0).expand(8, -1),
                attention_mask=torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device),
                max_new_tokens=8,
                min_new_tokens=2,
                repetition_penalty=1.2,
                eos_token_id=cap.eos_ids,
                pad_token_id=cap.pad_id,
                do_sample=False,
            )[:, emb.shape[1] :]
        ref = torch.nn.functional.pad(ref, (0, 8 - ref.shape[1]), value=cap.pad_id)
        for per_position in (False, True):
            fast = GreedyOPT(lm, cap.eos_ids, cap.pad_id, per_position=per_position)
            ours = fast.generate(emb, cap.prompt_ids, 8, 2, 1.2)
            assert fast.use_graphs and torch.equal(ours, ref), per_position
        cap.generate = Counter(cap, oom_above=2)  # type: ignore[method-assign]
        assert all(c and c[0] for c in cap.caption(imgs)) and cap.batch_size == 2
    finally:
        cap.close()
        slow.close()
