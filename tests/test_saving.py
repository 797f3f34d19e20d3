"""stpnet.save / stpnet.load: compressed models of any architecture round-trip bit-exactly onto a
freshly built base model; bad files and mismatched models are refused with clear errors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

import stpnet
from stpnet.models import build_model
from stpnet.nn import FactorizedEmbedding, FactorizedLinear
from stpnet.saving import SavedModelError, _digest

pytestmark = pytest.mark.usefixtures("one_thread")


class SharedAndTied(nn.Module):
    """A custom model: a Linear used twice, an attention, and an embedding tied to the output head."""

    def __init__(self, vocab=40, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(16, d)
        self.shared = nn.Linear(d, d)
        self.shared_again = self.shared  # one module under two names
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        h = self.shared_again(torch.tanh(self.shared(h)))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h + self.mlp(h))


class Conv1DLike(nn.Module):
    """HF Conv1D semantics (weight stored transposed), written without transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return (x.reshape(-1, x.shape[-1]) @ self.weight + self.bias).reshape(*x.shape[:-1], self.nf)


class HFStyle(nn.Module):
    """An HF-style model: keyword inputs, a dict output, Conv1D projections, untied head."""

    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.c_attn = Conv1DLike(3 * d, d)
        self.c_proj = Conv1DLike(d, 3 * d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.wte(input_ids)
        h = h + self.c_proj(torch.relu(self.c_attn(h)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.lm_head(h), "hidden_states": h}


def _round_trip(tmp_path, model, build, *inputs, **kwargs):
    path = stpnet.save(model, tmp_path / "model.pt")
    model.eval()
    loaded = stpnet.load(path, build())
    with torch.no_grad():
        return model(*inputs, **kwargs), loaded(*inputs, **kwargs), loaded


@pytest.mark.parametrize("fmt", ["tucker", "sttu", "tt", "stt", "tr", "str", "cp"])
def test_a_zoo_model_round_trips_bit_exactly(tmp_path, fmt):
    torch.manual_seed(0)
    init = "random" if fmt == "cp" else "decompose"  # CP's ALS decomposition of ResNet-20 takes seconds
    small, _ = stpnet.compress(build_model("resnet20"), fmt, compression=3, init=init)
    x = torch.randn(2, 3, 32, 32)
    expected, got, loaded = _round_trip(tmp_path, small, lambda: build_model("resnet20"), x)
    assert torch.equal(got, expected)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in small.parameters())


def test_a_vision_transformer_with_packed_attention_round_trips(tmp_path):
    torch.manual_seed(0)
    small, _ = stpnet.compress(build_model("vit-tiny"), "tt", compression=3)
    plan = stpnet.saving.compression_plan(small)
    assert plan["attention"] and all(entry["packed"] for entry in plan["attention"])
    x = torch.randn(2, 3, 32, 32)
    expected, got, _ = _round_trip(tmp_path, small, lambda: build_model("vit-tiny"), x)
    assert torch.equal(got, expected)


def test_load_leaves_the_global_random_state_as_it_was(tmp_path):
    small, _ = stpnet.compress(build_model("lenet5", in_channels=1), "tt", rank=3)
    stpnet.save(small, tmp_path / "m.pt")
    base = build_model("lenet5", in_channels=1)
    before = torch.random.get_rng_state()
    stpnet.load(tmp_path / "m.pt", base)
    assert torch.equal(before, torch.random.get_rng_state())


def test_a_custom_model_with_shared_layers_attention_and_a_tie_round_trips(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="tied"):
        small, report = stpnet.compress(SharedAndTied(), "stt", compression=2, keep_classifier=False,
                                        attention="separate")
    assert small.shared is small.shared_again
    assert isinstance(small.shared, FactorizedLinear) and isinstance(small.pos, FactorizedEmbedding)
    ids = torch.randint(0, 40, (3, 9))
    expected, got, loaded = _round_trip(tmp_path, small, SharedAndTied, ids)
    assert torch.equal(got, expected)
    assert loaded.head.weight is loaded.emb.weight  # the tie stays
    names = [n for n, _ in loaded.named_modules(remove_duplicate=False)]
    assert isinstance(loaded.shared, FactorizedLinear) and loaded.shared is loaded.shared_again
    assert isinstance(loaded.attn, stpnet.nn.UnpackedMultiheadAttention) and not loaded.attn.packed
    assert isinstance(loaded.attn.q_proj, FactorizedLinear) and "attn.q_proj" in names
    assert sum(p.numel() for p in loaded.parameters()) == report.params


def test_an_hf_style_model_with_transposed_layers_and_dict_output_round_trips(tmp_path):
    torch.manual_seed(0)
    small, _ = stpnet.compress(HFStyle(), "tt", compression=2)
    assert isinstance(small.c_attn, FactorizedLinear)
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6)
    expected, got, loaded = _round_trip(tmp_path, small, HFStyle, input_ids=ids, attention_mask=mask)
    assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert isinstance(loaded.c_attn, FactorizedLinear)


@pytest.mark.slow
def test_an_hf_gpt2_round_trips_bit_exactly(tmp_path):
    tf = pytest.importorskip("transformers")
    config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0,
                           eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    small, _ = stpnet.compress(tf.GPT2LMHeadModel(config), "stt", compression=4, keep_classifier=False)
    ids = torch.randint(0, 128, (2, 10))
    path = stpnet.save(small.eval(), tmp_path / "gpt2.pt")
    loaded = stpnet.load(path, tf.GPT2LMHeadModel(config))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, small(ids).logits)
    out = loaded.generate(ids[:, :3], attention_mask=torch.ones(2, 3, dtype=torch.long), max_new_tokens=3,
                          do_sample=False, pad_token_id=0)
    assert out.shape == (2, 6)


# ------------------------------------------------------------------------------- refusals
@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    small, _ = stpnet.compress(HFStyle(), "tt", compression=2)
    return stpnet.save(small, tmp_path / "m.pt")


def test_a_different_architecture_is_refused(saved):
    with pytest.raises(SavedModelError, match="compressed .*HFStyle, the base model is a .*SharedAndTied"):
        stpnet.load(saved, SharedAndTied())
    with pytest.raises(SavedModelError, match="geometry .*different architecture"):
        stpnet.load(saved, HFStyle(d=48))
    with pytest.raises(SavedModelError, match="does not have"):
        stpnet.load(saved, nn.Sequential(nn.Linear(2, 2)), strict_class=False)
    with pytest.raises(TypeError, match="nn.Module"):
        stpnet.load(saved, "HFStyle")


def _rewrite(path, edit):
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


def test_a_plan_naming_a_missing_layer_is_refused(saved):
    def rename(payload):
        plan = json.loads(payload["plan"])
        plan["layers"][0]["name"] = plan["layers"][0]["aliases"][0] = "blocks.7.c_fc"
        payload["plan"] = json.dumps(plan, sort_keys=True)
        payload["sha256"] = _digest(payload["plan"], payload["state"])  # a consistent but wrong file

    _rewrite(saved, rename)
    with pytest.raises(SavedModelError, match="names layer 'blocks.7.c_fc', which the base model does not have"):
        stpnet.load(saved, HFStyle())


def test_an_edited_file_fails_the_checksum(saved):
    def edit(payload):
        key = next(k for k in payload["state"] if "factors" in k or "cores" in k)
        payload["state"][key] = payload["state"][key] + 1e-3

    _rewrite(saved, edit)
    with pytest.raises(SavedModelError, match="SHA-256 check failed"):
        stpnet.load(saved, HFStyle())


def test_a_corrupted_or_foreign_file_is_refused(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    broken = tmp_path / "broken.pt"
    broken.write_bytes(bytes(data))
    with pytest.raises(SavedModelError, match="SHA-256|not a readable"):
        stpnet.load(broken, HFStyle())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(saved.read_bytes()[:100])
    with pytest.raises(SavedModelError, match="not a readable"):
        stpnet.load(truncated, HFStyle())
    plain = tmp_path / "state.pt"
    torch.save(HFStyle().state_dict(), plain)
    with pytest.raises(SavedModelError, match="not an stpnet saved model"):
        stpnet.load(plain, HFStyle())
    with pytest.raises(FileNotFoundError):
        stpnet.load(tmp_path / "absent.pt", HFStyle())


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_file_that_needs_code_to_load_runs_none(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "stpnet-compressed-model", "version": 1, "plan": _Payload(), "state": {},
                "sha256": ""}, path)
    with pytest.raises(SavedModelError, match="needs code to load"):
        stpnet.load(path, HFStyle())
    assert "code ran" not in capsys.readouterr().out
    with open(tmp_path / "pickle.pt", "wb") as f:
        pickle.dump(_Payload(), f)
    with pytest.raises(SavedModelError):
        stpnet.load(tmp_path / "pickle.pt", HFStyle())
    assert "code ran" not in capsys.readouterr().out


def test_a_fused_model_is_refused_at_save(tmp_path):
    small, _ = stpnet.compress(HFStyle(), "tt", compression=2)
    fused = stpnet.fuse(small.eval())  # without an example: every layer a contraction chain
    assert any(isinstance(m, stpnet.deploy.fused.FusedLayer) for m in fused.modules())
    with pytest.raises(SavedModelError, match="before stpnet.fuse"):
        stpnet.save(fused, tmp_path / "f.pt")
