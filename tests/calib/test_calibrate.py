import json
from dataclasses import replace

import pytest
import torch

import quept
from quept.calib import CalibrationError, CheckpointCorruptError, CheckpointMismatchError
from quept.config import CalibConfig, ConfigError, ElasticSpec, QuEPTConfig
from quept.models import UnsupportedModelError
from quept.nn import elastic_layers
from quept.nn.state import elastic_state_dict

from ..conftest import tiny_model

SPEC = ElasticSpec(ranks=(2, 2, 2, 2), default_group_size=32)
CFG = CalibConfig(n_samples=8, seq_len=32, batch_size=4, epochs=6, lr_adapter=3e-4, lr_clip=0.05)


def ids(n: int = 8, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def calibrated(kind: str = "llama", cfg: CalibConfig = CFG, **kw):
    model = quept.prepare(tiny_model(kind), SPEC, seed=cfg.seed)
    reports = quept.calibrate(model, ids(cfg.n_samples, cfg.seq_len), cfg, progress=False, **kw)
    return model, reports


@pytest.mark.parametrize("kind, stream", [
    ("llama", "per-group"), ("mistral", "per-group"), ("qwen2", "per-group"), ("llama", "merged"),
])
def test_reconstruction_loss_falls_for_every_group(kind, stream, monkeypatch):
    # The paper's method (every group trains its adapter prefix and clips) from the paper's
    # constant clip init (no clip search, which starts the high widths near their optimum
    # already): training must lower every group's loss.
    spec = replace(SPEC, stream=stream, clip_search_bits=(), fixed_clip_bits=())
    monkeypatch.setattr(f"{__name__}.SPEC", spec)
    model, reports = calibrated(kind)
    assert len(reports) == 2
    for r in reports:
        assert r.bits == [7, 5, 3, 2]
        for before, after, b in zip(r.loss_before, r.loss_after, r.bits):
            assert after < before, f"block {r.block} bit {b}: {before} -> {after}"


def test_a_group_with_nothing_to_learn_keeps_its_searched_clips(monkeypatch):
    # The CPU default: the top group has no adapter (rank 0) and fixed clips, so it is not
    # trained: its loss does not move and its clips are the search's; the others still learn.
    spec = replace(SPEC, ranks=(0, 2, 2, 2))
    assert spec.learned_clip_bits == (6, 5, 4, 3, 2)
    monkeypatch.setattr(f"{__name__}.SPEC", spec)
    model, reports = calibrated()
    for r in reports:
        assert r.loss_after[0] == r.loss_before[0], r
        assert r.loss_after[-1] < r.loss_before[-1], r
    for m in elastic_layers(model).values():
        assert not m.delta(8).any()
        for b in (7, 8):
            # Searched factors (max and min refined apart) are whole quantization steps, or
            # exactly no clip.
            for logits in (m.clip_hi, m.clip_lo):
                steps = (1 - torch.sigmoid(logits[str(b)])) * (2**b - 1)
                assert torch.allclose(steps, steps.round(), atol=1e-3), b


def test_default_spec_lowers_the_lowest_group_loss():
    _, reports = calibrated()
    for r in reports:
        assert r.loss_after[-1] < r.loss_before[-1], r


def test_same_seed_same_artifact_and_other_seed_differs():
    a, _ = calibrated()
    b, _ = calibrated()
    c, _ = calibrated(cfg=CalibConfig(**{**CFG.to_dict(), "seed": 1}))
    sa, sb, sc = elastic_state_dict(a), elastic_state_dict(b), elastic_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("stream", ["per-group", "merged"])
def test_resume_after_kill_gives_the_same_model(tmp_path, monkeypatch, stream):
    monkeypatch.setattr(f"{__name__}.SPEC", replace(SPEC, stream=stream))
    ref, _ = calibrated()
    from quept.calib import loop

    calls = {"n": 0}
    real = loop.BlockCalibrator._train

    def dies_in_second_block(self, i, *a, **k):
        if i == 1:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return real(self, i, *a, **k)

    monkeypatch.setattr(loop.BlockCalibrator, "_train", dies_in_second_block)
    with pytest.raises(KeyboardInterrupt):
        calibrated(checkpoint_dir=tmp_path)
    assert json.loads((tmp_path / "progress.json").read_text())["next_block"] == 1
    monkeypatch.setattr(loop.BlockCalibrator, "_train", real)
    resumed, reports = calibrated(checkpoint_dir=tmp_path)
    assert [r.block for r in reports] == [0, 1]
    sr, sx = elastic_state_dict(ref), elastic_state_dict(resumed)
    assert all(torch.equal(sr[k], sx[k]) for k in sr)
    # A checkpoint from other settings is refused, not silently reused.
    with pytest.raises(CheckpointMismatchError, match=r"other calib settings \(calib.epochs "
                                                      rf"{CFG.epochs} -> 2\)"):
        calibrated(cfg=CalibConfig(**{**CFG.to_dict(), "epochs": 2}), checkpoint_dir=tmp_path)


def _killed_in_second_block(folder, monkeypatch):
    """A checkpoint folder holding block 0 done, as a run killed in block 1 leaves it."""
    from quept.calib import loop

    real = loop.BlockCalibrator._train

    def dies_in_second_block(self, i, *a, **k):
        if i == 1:
            raise KeyboardInterrupt("simulated kill")
        return real(self, i, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(loop.BlockCalibrator, "_train", dies_in_second_block)
        with pytest.raises(KeyboardInterrupt):
            calibrated(checkpoint_dir=folder)
    return folder


@pytest.mark.parametrize("name, damage, says", [
    ("progress.json", b'{"next_block": 1,', "progress.json is not valid JSON"),
    ("progress.json", b'{"next_block": "one", "fingerprint": {}}', "progress.json lacks"),
    ("progress.json", b'[1, 2]', "progress.json holds a JSON list, not an object"),
    ("block_000.safetensors", b"\x00junk", "block_000.safetensors cannot be read"),
    ("block_000.safetensors", None, "block_000.safetensors is missing"),
    ("streams_001.safetensors", b"\x00junk", "streams_001.safetensors cannot be read"),
    # the streams resuming starts from: a damaged checkpoint, not a block whose were not kept
    ("streams_001.safetensors", None, "streams_001.safetensors is missing"),
])
def test_a_damaged_checkpoint_is_named_and_can_be_discarded(tmp_path, monkeypatch, name, damage,
                                                           says):
    from quept.calib.checkpoint import CalibCheckpoint

    folder = _killed_in_second_block(tmp_path / "ckpt", monkeypatch)
    if damage is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(damage)
    with pytest.raises(CheckpointCorruptError, match=f"{says}.*--restart"):
        calibrated(checkpoint_dir=folder)
    CalibCheckpoint(folder, {}).clear()
    _, reports = calibrated(checkpoint_dir=folder)  # from block 0 again
    assert [r.block for r in reports] == [0, 1]


def test_streams_of_one_kind_missing_from_a_file_are_named(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    folder = _killed_in_second_block(tmp_path / "ckpt", monkeypatch)
    path = folder / "streams_001.safetensors"
    t = load_file(str(path))
    del t["x_fp"]
    save_file(t, str(path))
    with pytest.raises(CheckpointCorruptError, match=r"streams_001.safetensors lacks \['x_fp'\]"):
        calibrated(checkpoint_dir=folder)


@pytest.mark.parametrize("stream", ["per-group", "merged"])
def test_keep_streams_keeps_what_entered_every_block(tmp_path, monkeypatch, stream):
    from quept.calib.checkpoint import CalibCheckpoint

    monkeypatch.setattr(f"{__name__}.SPEC", replace(SPEC, stream=stream))
    _, reports = calibrated(checkpoint_dir=tmp_path / "keep", keep_streams=True)
    n = len(reports)
    keep = CalibCheckpoint(tmp_path / "keep", {})
    x0, x0_q = keep.streams(0)  # the first block's input, shared by every bit group
    assert len(x0_q) == len(SPEC.bit_groups) and all(torch.equal(x, x0) for x in x0_q)
    for block in range(1, n + 1):
        x_fp, x_q = keep.streams(block)
        assert x_fp.shape == (CFG.n_samples, CFG.seq_len, x_q[0].shape[-1])
        assert len(x_q) == len(SPEC.bit_groups)  # one per bit group (merged: the same one)
        assert not torch.equal(x_q[-1], x_fp)  # the 2-bit stream is not the float one
    calibrated(checkpoint_dir=tmp_path / "latest")
    latest = CalibCheckpoint(tmp_path / "latest", {})
    latest.streams(n)
    with pytest.raises(FileNotFoundError, match=f"has \\[{n}\\].*--keep-streams"):
        latest.streams(1)


def test_nan_loss_stops_with_block_bit_and_step():
    model = quept.prepare(tiny_model(), SPEC)
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"block 1, bit \d: loss became nan at step 0"):
        quept.calibrate(model, ids(), CFG, progress=False)


def test_save_load_identity_at_every_width(tmp_path, monkeypatch):
    model, _ = calibrated()
    base = tmp_path / "base"
    model_fp = tiny_model()
    model_fp.save_pretrained(base)
    model.quept_source = str(base)
    quept.save(model, tmp_path / "elastic", QuEPTConfig(spec=SPEC, calib=CFG))
    loaded = _load_without_tokenizer(tmp_path / "elastic", monkeypatch)
    x = ids(2, 16, seed=5)
    for b in [None, *SPEC.bits]:
        quept.set_bits(model, b)
        quept.set_bits(loaded, b)
        with torch.no_grad():
            assert torch.equal(model(x).logits, loaded(x).logits), b


def _load_without_tokenizer(folder, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    model, _ = quept.load(folder)
    return model


def test_load_refuses_other_base_model(tmp_path, monkeypatch):
    model, _ = calibrated()
    other = tmp_path / "other"
    tiny_model(seed=3).save_pretrained(other)
    model.quept_source = str(other)
    quept.save(model, tmp_path / "elastic", QuEPTConfig(spec=SPEC, calib=CFG))
    with pytest.raises(quept.ArtifactError, match="base model weights differ"):
        _load_without_tokenizer(tmp_path / "elastic", monkeypatch)


def _saved_elastic(tmp_path):
    """A calibrated elastic folder (and its base model folder) under ``tmp_path``."""
    model, _ = calibrated()
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    model.quept_source = str(base)
    return quept.save(model, tmp_path / "elastic", QuEPTConfig(spec=SPEC, calib=CFG))


def test_corrupt_weights_file_is_reported(tmp_path, monkeypatch):
    out = _saved_elastic(tmp_path)
    (out / "elastic.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(quept.ArtifactError, match="cannot be read"):
        _load_without_tokenizer(out, monkeypatch)


def test_inputs_of_the_wrong_kind_are_refused_by_name():
    model = quept.prepare(tiny_model(), SPEC)
    vocab = model.get_input_embeddings().num_embeddings
    for bad, says in ((ids().float(), "integer token ids.*float32 of shape \\(8, 32\\)"),
                      (ids()[0], "\\(N, T\\) integer token ids.*shape \\(32,\\)"),
                      (ids()[:, :0], "N, T >= 1"),
                      (ids() + vocab, f"token ids from {vocab}.*vocabulary is 0..{vocab - 1}"),
                      (ids().tolist(), "must be a torch.Tensor, got list")):
        with pytest.raises(ConfigError, match=says):
            quept.calibrate(model, bad, CFG, progress=False)
    from tests.test_swin_deit import tiny as tiny_classifier

    vit = quept.prepare(tiny_classifier("vit"), SPEC)
    with pytest.raises(ConfigError, match="must be \\(N, C, H, W\\) float pixel values "
                                          "with N >= 1 for an image classifier"):
        quept.calibrate(vit, ids(), CFG, progress=False)


def test_non_finite_values_in_the_weights_file_are_reported(tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = _saved_elastic(tmp_path)
    state = load_file(str(out / "elastic.safetensors"))
    name = sorted(k for k, t in state.items() if t.is_floating_point())[0]
    state[name][..., 0] = float("nan")
    with safe_open(str(out / "elastic.safetensors"), "pt") as f:
        kept = f.metadata()  # the values damaged, the file otherwise the one saved
    save_file(state, str(out / "elastic.safetensors"), metadata=kept)
    with pytest.raises(quept.ArtifactError, match=f"1 tensor\\(s\\) hold non-finite values "
                       f"\\(e.g. {name}\\)"):
        _load_without_tokenizer(out, monkeypatch)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*llama"):
        quept.prepare(model, SPEC)


def test_group_size_that_does_not_divide_names_the_layer():
    from quept.ops import GroupSizeError

    with pytest.raises(GroupSizeError, match="block 0 self_attn.q_proj: group size 48"):
        quept.prepare(tiny_model(), ElasticSpec(default_group_size=48))


def test_prepare_wraps_every_block_linear():
    model = quept.prepare(tiny_model(), SPEC)
    names = list(elastic_layers(model))
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"
    assert "lm_head" not in names


@pytest.mark.parametrize("draw", ["random", "balanced"])
def test_balanced_draw_trains_each_width_of_a_group_equally(draw, monkeypatch):
    from quept.nn import ElasticLinear

    seen: list[int] = []
    real = ElasticLinear.forward

    def spy(self, x):
        if torch.is_grad_enabled() and self is first[0]:
            seen.append(self.bits)
        return real(self, x)

    model = quept.prepare(tiny_model(), SPEC, seed=0)
    first = [next(iter(elastic_layers(model).values()))]  # block 0, trained in steps only
    monkeypatch.setattr(ElasticLinear, "forward", spy)
    cfg = replace(CFG, draw=draw)
    quept.calibrate(model, ids(cfg.n_samples, cfg.seq_len), cfg, progress=False)
    steps = cfg.epochs * cfg.steps_per_epoch
    counts = {b: seen.count(b) for b in SPEC.bits}
    assert sum(counts.values()) == steps * len(SPEC.bit_groups)
    assert counts[2] == steps
    pairs = [(counts[hi], counts[lo]) for hi, lo in ((8, 7), (6, 5), (4, 3))]
    if draw == "balanced":
        assert all(a == b == steps // 2 for a, b in pairs), counts
    else:  # independent draws: over 3 groups x 12 steps some split is uneven
        assert any(a != b for a, b in pairs), counts
    with pytest.raises(quept.ConfigError, match="draw must be"):
        CalibConfig(draw="cyclic")


def test_adapter_rate_per_group_moves_only_the_slices_given_a_rate():
    # Rate 0 for the second group: the slice it adds (columns 2:4 of U, rows 2:4 of V) keeps its
    # initial value; the slices of the groups with a rate train.
    cfg = replace(CFG, epochs=2, lr_adapter_groups=(1e-3, 0.0, 1e-3, 3e-3))
    start = quept.prepare(tiny_model("llama"), SPEC, seed=cfg.seed)
    init = {n: (m.lora_u.clone(), m.lora_v.clone()) for n, m in elastic_layers(start).items()}
    model, _ = calibrated(cfg=cfg)
    for n, m in elastic_layers(model).items():
        u0, v0 = init[n]
        assert torch.equal(m.lora_u[:, 2:4], u0[:, 2:4]) and torch.equal(m.lora_v[2:4], v0[2:4])
        for lo in (0, 4, 6):
            assert not torch.equal(m.lora_u[:, lo:lo + 2], u0[:, lo:lo + 2]), (n, lo)


def test_adapter_rates_must_match_the_bit_groups():
    with pytest.raises(ValueError, match="one rate per group"):
        calibrated(cfg=replace(CFG, lr_adapter_groups=(1e-3, 1e-3)))
    with pytest.raises(ValueError, match="one finite rate >= 0 per bit group"):
        replace(CFG, lr_adapter_groups=(1e-3, -1.0, 1e-3, 1e-3))
    cfg = replace(CFG, lr_adapter_groups=[1e-3, 0, 1e-3, 2e-3])
    assert cfg.lr_adapter_groups == (1e-3, 0.0, 1e-3, 2e-3)
    assert CalibConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "lr_adapter_groups" not in CFG.to_dict()


def test_protected_super_weight_clips_stay_at_one_through_training(monkeypatch, caplog):
    # A tiny random model has no massive activation, so a low ratio (2) stands in for the
    # real 100 to make the calibrator find some. Held logits sit where the sigmoid is exactly
    # 1 in float32, so their gradient is 0 and training leaves them there.
    from quept.nn.elastic_linear import NO_CLIP_LOGIT

    spec = replace(SPEC, protect_outliers=2.0, fixed_clip_bits=())
    monkeypatch.setattr(f"{__name__}.SPEC", spec)
    with caplog.at_level("INFO", logger="quept.calib.loop"):
        model, _ = calibrated()
    found = 0
    for m in elastic_layers(model).values():
        for r, j in m.protected:
            found += 1
            side = m.clip_hi if m.weight[r, j] > 0 else m.clip_lo
            for b in spec.bits:
                assert side[str(b)][r, j // 32] == NO_CLIP_LOGIT, (b, r, j)
    assert found > 0
    assert "super weight" in caplog.text
    # Off by default: nothing is searched for or held.
    monkeypatch.setattr(f"{__name__}.SPEC", replace(spec, protect_outliers=0.0))
    model, _ = calibrated()
    assert not any(m.protected for m in elastic_layers(model).values())


def test_massive_term_weighs_a_lost_massive_activation():
    from quept.calib.loop import _loss_fn, massive_mask, massive_term

    l1 = _loss_fn("l1")
    target = torch.ones(2, 16, 8)
    target[0, 0, 3] = 27000.0
    kept, lost = target.clone(), target.clone()
    kept[0, 0, 3] = 26000.0
    lost[0, 0, 3] = 2700.0
    big = massive_mask(target, 1000.0)
    assert big.sum() == 1 and big[0, 0, 3]
    assert massive_mask(torch.ones(2, 16, 8), 1000.0) is None  # nothing massive
    # Plain L1 sees one element in 256: a lost massive value costs little more than a kept one.
    assert l1(lost, target) - l1(kept, target) < 100
    # The term is its relative error: 0.9 lost, 1/27 kept.
    assert massive_term(lost, target, big) == pytest.approx(0.9, rel=1e-4)
    assert massive_term(kept, target, big) == pytest.approx(1000 / 27000, rel=1e-4)
    # With slack 0.5 (the config's default) only the error beyond half the value counts: a
    # kept value adds exactly nothing, gradient included, and a lost one adds 0.9 - 0.5.
    assert massive_term(lost, target, big, 0.5) == pytest.approx(0.4, rel=1e-4)
    out = kept.clone().requires_grad_()
    (l1(out, target) + massive_term(out, target, big, 0.5)).backward()
    ref = kept.clone().requires_grad_()
    l1(ref, target).backward()
    assert massive_term(kept, target, big, 0.5) == 0
    assert torch.equal(out.grad, ref.grad)


def test_bf16_steps_train_in_bfloat16_and_lower_every_groups_loss(monkeypatch):
    spec = replace(SPEC, clip_search_bits=(), fixed_clip_bits=())
    monkeypatch.setattr(f"{__name__}.SPEC", spec)
    model = quept.prepare(tiny_model("llama"), spec, seed=0)
    seen = []  # (grad enabled, output dtype) of one linear's calls
    first = next(iter(elastic_layers(model).values()))
    first.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.dtype)))
    cfg = replace(CFG, bf16=True)
    reports = quept.calibrate(model, ids(), cfg, progress=False)
    assert {d for g, d in seen if g} == {torch.bfloat16}  # the training steps
    assert {d for g, d in seen if not g} == {torch.float32}  # streams and logged losses
    for r in reports:
        for before, after, b in zip(r.loss_before, r.loss_after, r.bits):
            assert after < before, f"block {r.block} bit {b}: {before} -> {after}"
    assert cfg.to_dict()["bf16"] is True and "bf16" not in CFG.to_dict()  # old folders match
    assert CalibConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="field .bf16. must be bool"):
        CalibConfig(bf16="yes")
