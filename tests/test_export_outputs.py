"""Export of models with keyword inputs and dict / dataclass / tuple outputs: the outputs are
flattened, named, and checked against PyTorch (ONNX through ONNX Runtime, and TorchScript)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import stpnet
from stpnet.deploy.export import export

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor
    loss: torch.Tensor | None = None


class KeywordModel(nn.Module):
    """Keyword inputs (ids and a mask), a dict output with a nested tuple and a None entry."""

    def __init__(self, vocab=30, d=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = nn.Sequential(nn.Linear(d, 48), nn.GELU(), nn.Linear(48, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        h = h + self.body(h)
        return {"logits": self.head(h), "extra": (h.mean(-1), h.amax(-1)), "cache": None}


class DataclassModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return Output(self.b(h), h)


@pytest.fixture(scope="module")
def compressed():
    torch.manual_seed(0)
    small, _ = stpnet.compress(KeywordModel(), "stt", compression=1.5)
    ids = torch.randint(0, 30, (3, 7))
    return small.eval(), {"input_ids": ids, "attention_mask": torch.ones(3, 7)}


def test_a_dict_output_keyword_input_model_exports_to_onnx_checked_in_onnxruntime(compressed, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    small, example = compressed
    result = export(small, tmp_path / "m.onnx", example)
    assert result.input_names == ("input_ids", "attention_mask")
    assert result.output_names == ("logits", "extra.0", "extra.1")
    assert result.max_abs_difference is not None and result.max_abs_difference < 1e-4
    # independently: run the file on another batch size and compare each named output
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(result.output_names)
    ids = torch.randint(0, 30, (5, 7))
    mask = (torch.rand(5, 7) > 0.3).float()
    got = dict(zip(result.output_names, session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})))
    with torch.no_grad():
        want = small(ids, mask)
    np.testing.assert_allclose(got["logits"], want["logits"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["extra.1"], want["extra"][1].numpy(), rtol=1e-4, atol=1e-5)


def test_a_dict_output_model_exports_to_torchscript(compressed, tmp_path):
    small, example = compressed
    result = export(small, tmp_path / "m.pt", example)
    assert result.output_names == ("logits", "extra.0", "extra.1") and result.max_abs_difference < 1e-4
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    logits, mean, peak = loaded(*example.values())
    with torch.no_grad():
        torch.testing.assert_close(logits, small(**example)["logits"], rtol=1e-4, atol=1e-5)


def test_dataclass_and_tuple_outputs_are_flattened_and_a_single_tensor_keeps_x_and_y(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = DataclassModel()
    result = export(model, tmp_path / "d.onnx", torch.randn(2, 16))
    assert result.output_names == ("logits", "hidden") and result.max_abs_difference < 1e-5
    plain = export(nn.Linear(4, 3), tmp_path / "p.onnx", torch.randn(2, 4))
    assert (plain.input_names, plain.output_names) == (("x",), ("y",))
    pair = export(nn.Bilinear(4, 5, 3), tmp_path / "b.pt", (torch.randn(2, 4), torch.randn(2, 5)))
    assert pair.input_names == ("x0", "x1") and pair.max_abs_difference < 1e-5


def test_unexportable_outputs_and_examples_are_refused_clearly(tmp_path):
    class Strange(nn.Module):
        def forward(self, x):
            return {"text": "not a tensor", "y": x}

    with pytest.raises(ValueError, match="returned a str at 'text'"):
        export(Strange(), tmp_path / "s.onnx", torch.randn(2, 3))
    with pytest.raises(ValueError, match="example must be"):
        export(nn.Linear(2, 2), tmp_path / "s.onnx", "x")
    with pytest.raises(ValueError, match="keyword names"):
        export(nn.Linear(2, 2), tmp_path / "s.onnx", {1: torch.randn(2, 2)})


@pytest.mark.slow
def test_an_hf_gpt2_exports_with_its_model_output_flattened(tmp_path):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    config = tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16, use_cache=False,
                           bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    small, _ = stpnet.compress(tf.GPT2LMHeadModel(config), "tt", compression=2, keep_classifier=False,
                               exclude=["transformer.wte", "lm_head"])
    ids = torch.randint(0, 64, (2, 8))
    result = export(small, tmp_path / "gpt2.onnx", {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert result.output_names[0] == "logits" and result.max_abs_difference < 1e-3
