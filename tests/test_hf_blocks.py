"""FSG on Hugging Face transformers blocks (tiny random-init models, no downloads), each block against its
formula written out from its submodules' weights, folding, Gradient Routing, the KV cache, save and load."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

from fsg_endo.errors import FsgEndoError  # noqa: E402
from fsg_endo.nn.gates import (  # noqa: E402
    fold_gates,
    gate_parameters,
    gate_statistics,
    gate_values,
    gated_blocks,
    inject_fsg,
    non_gate_parameters,
)
from fsg_endo.nn.hf_pretrained import from_pretrained_with_fsg  # noqa: E402
from fsg_endo.nn.routing import GradientRouter  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, FFN = 64, 32, 2, 2, 64
TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert_config(**kw) -> BertConfig:
    return BertConfig(**TEXT, **NO_DROPOUT, intermediate_size=FFN, max_position_embeddings=16, num_labels=3, **kw)


def roberta_config() -> RobertaConfig:
    return RobertaConfig(**TEXT, **NO_DROPOUT, intermediate_size=FFN, max_position_embeddings=20, num_labels=3)


def distilbert_config() -> DistilBertConfig:
    return DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=16,
        dropout=0.0, attention_dropout=0.0, num_labels=3,
    )  # fmt: skip


def gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=32, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip


def vit_config() -> ViTConfig:
    return ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        image_size=16, patch_size=8, num_labels=3, **NO_DROPOUT,
    )  # fmt: skip


def text_inputs(seed: int = 1) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def pixel_inputs(seed: int = 1) -> dict[str, Tensor]:
    return {"pixel_values": torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}


def randomise_gates(model: nn.Module, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in gate_parameters(model):
            g.copy_(torch.randn(g.shape, generator=gen) * 2)


def gated(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = inject_fsg(factory().eval())
    randomise_gates(model)
    return model


# --- the blocks' math, written out from their submodules' weights -------------------------------------------


def lin(x: Tensor, layer: nn.Module) -> Tensor:
    """x W^T + b for nn.Linear; x W + b for transformers' Conv1D, whose weight is stored (in, out)."""
    weight = layer.weight if isinstance(layer, Conv1D) else layer.weight.T
    return x @ weight + layer.bias


def norm(x: Tensor, ln: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None, causal: bool = False) -> Tensor:
    """Multi-head attention of (batch, tokens, dim) projections; ``keep`` (batch, tokens) masks padded keys."""
    b, n, d = q.shape
    q, k, v = (t.reshape(b, n, HEADS, d // HEADS).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // HEADS)
    if keep is not None:
        scores = scores.masked_fill(~keep.bool()[:, None, None, :], float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


def hand_bert(x: Tensor, layer: nn.Module, s_attn: Tensor, s_mlp: Tensor, keep: Tensor | None) -> Tensor:
    """Post-norm: LN(x + s * branch(x)) for both branches (BERT, RoBERTa)."""
    sa, out = layer.attention.self, layer.attention.output
    a = attention(lin(x, sa.query), lin(x, sa.key), lin(x, sa.value), keep)
    x = norm(x + s_attn * lin(a, out.dense), out.LayerNorm)
    h = F.gelu(lin(x, layer.intermediate.dense))
    return norm(x + s_mlp * lin(h, layer.output.dense), layer.output.LayerNorm)


def hand_distilbert(x: Tensor, layer: nn.Module, s_attn: Tensor, s_mlp: Tensor, keep: Tensor | None) -> Tensor:
    att = layer.attention
    a = attention(lin(x, att.q_lin), lin(x, att.k_lin), lin(x, att.v_lin), keep)
    x = norm(x + s_attn * lin(a, att.out_lin), layer.sa_layer_norm)
    h = F.gelu(lin(x, layer.ffn.lin1))
    return norm(x + s_mlp * lin(h, layer.ffn.lin2), layer.output_layer_norm)


def hand_gpt2(x: Tensor, layer: nn.Module, s_attn: Tensor, s_mlp: Tensor, keep: Tensor | None) -> Tensor:
    """Pre-norm, causal: x + s * branch(LN(x)); GPT-2's gelu is the tanh approximation."""
    q, k, v = lin(norm(x, layer.ln_1), layer.attn.c_attn).split(HIDDEN, dim=-1)
    x = x + s_attn * lin(attention(q, k, v, keep, causal=True), layer.attn.c_proj)
    h = F.gelu(lin(norm(x, layer.ln_2), layer.mlp.c_fc), approximate="tanh")
    return x + s_mlp * lin(h, layer.mlp.c_proj)


def hand_vit(x: Tensor, layer: nn.Module, s_attn: Tensor, s_mlp: Tensor, keep: Tensor | None) -> Tensor:
    att, h = layer.attention, norm(x, layer.layernorm_before)
    x = x + s_attn * lin(attention(lin(h, att.q_proj), lin(h, att.k_proj), lin(h, att.v_proj)), att.o_proj)
    h = F.gelu(lin(norm(x, layer.layernorm_after), layer.mlp.fc1))
    return x + s_mlp * lin(h, layer.mlp.fc2)


# family -> (bare model, its layers, inputs, hand formula, the model's final norm applied to the last hidden state)
FAMILIES = {
    "bert": (lambda: BertModel(bert_config()), lambda m: m.encoder.layer, text_inputs, hand_bert, None),
    "roberta": (lambda: RobertaModel(roberta_config()), lambda m: m.encoder.layer, text_inputs, hand_bert, None),
    "distilbert": (
        lambda: DistilBertModel(distilbert_config()), lambda m: m.transformer.layer, text_inputs, hand_distilbert, None
    ),
    "gpt2": (lambda: GPT2Model(gpt2_config()), lambda m: m.h, text_inputs, hand_gpt2, lambda m: m.ln_f),
    "vit": (lambda: ViTModel(vit_config(), add_pooling_layer=False), lambda m: m.layers, pixel_inputs,
            hand_vit, None),
}  # fmt: skip
# family -> a task model (a head on top) for folding
TASK_MODELS = {
    "bert": (lambda: BertForSequenceClassification(bert_config()), text_inputs),
    "roberta": (lambda: RobertaForSequenceClassification(roberta_config()), text_inputs),
    "distilbert": (lambda: DistilBertForSequenceClassification(distilbert_config()), text_inputs),
    "gpt2": (lambda: GPT2LMHeadModel(gpt2_config()), text_inputs),
    "vit": (lambda: ViTForImageClassification(vit_config()), pixel_inputs),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_each_gated_block_computes_its_formula(family):
    factory, layers_of, inputs_of, hand, final_norm = FAMILIES[family]
    model = gated(factory)
    inputs = inputs_of()
    hidden = model(**inputs, output_hidden_states=True).hidden_states
    assert len(hidden) == LAYERS + 1
    keep = inputs.get("attention_mask")
    for i, layer in enumerate(layers_of(model)):
        expected = hand(hidden[i], layer, torch.sigmoid(layer.gate_attn), torch.sigmoid(layer.gate_mlp), keep)
        if final_norm is not None and i == LAYERS - 1:
            expected = norm(expected, final_norm(model))  # GPT-2 reports its last hidden state after ln_f
        torch.testing.assert_close(hidden[i + 1], expected, atol=2e-5, rtol=1e-4, msg=f"{family} layer {i}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_injection_reuses_the_weights_and_adds_two_gates_per_block(family):
    factory, layers_of, inputs_of, *_ = FAMILIES[family]
    torch.manual_seed(0)
    model = factory().eval()
    before = dict(model.named_parameters())
    assert inject_fsg(model) is model
    assert gated_blocks(model) == list(layers_of(model))
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[name] is p for name, p in before.items())
    names = {id(m): name for name, m in model.named_modules()}
    gate_keys = [f"{names[id(b)]}.{g}" for b in layers_of(model) for g in ("gate_attn", "gate_mlp")]
    assert sorted(set(after) - set(before)) == sorted(gate_keys)
    gates = gate_parameters(model)
    assert [g.shape for g in gates] == [(HIDDEN,)] * 2 * LAYERS
    assert {id(g) for g in gates} == {id(after[k]) for k in gate_keys}  # each gate under one key only
    assert {id(p) for p in non_gate_parameters(model)} == {id(p) for p in before.values()}
    assert all(0.25 < v < 0.75 for g in gates for v in torch.sigmoid(g).tolist())  # the ViT init: near 0.5
    assert list(gate_values(model)) == [f"{b}_{i:02d}" for i in range(LAYERS) for b in ("attn", "mlp")]
    stats = gate_statistics(model)
    assert {f"gates/{b}/layer_{i:02d}/mean" for i in range(LAYERS) for b in ("attn", "mlp")} <= set(stats)
    assert inject_fsg(model) is model and len(gate_parameters(model)) == 2 * LAYERS  # idempotent


@pytest.mark.parametrize("family", sorted(TASK_MODELS))
@torch.no_grad()
def test_folding_gives_a_stock_model_with_the_gated_outputs(family):
    factory, inputs_of = TASK_MODELS[family]
    model = gated(factory)
    inputs = inputs_of()
    expected = model(**inputs).logits
    folded = fold_gates(model)
    assert type(folded) is type(model)
    torch.manual_seed(0)
    stock = factory()
    assert folded.state_dict().keys() == stock.state_dict().keys()
    assert not any(m._forward_hooks for m in folded.modules())
    torch.testing.assert_close(folded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    assert len(gated_blocks(model)) == LAYERS  # the input keeps its gates
    randomise_gates(model, seed=5)
    assert not torch.allclose(model(**inputs).logits, expected, rtol=1e-3, atol=0)  # the gates matter


# --- Gradient Routing ----------------------------------------------------------------------------------------

LR_MAIN, LR_GATE = 0.05, 0.5


def cross_entropy(out, labels: Tensor) -> Tensor:
    return F.cross_entropy(out.logits, labels)


def gate_loss(out, labels: Tensor) -> Tensor:
    return 3.0 * F.cross_entropy(out.logits, labels)


def clipped(grads: list[Tensor], max_norm: float) -> list[Tensor]:
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    return [g * min(1.0, max_norm / (float(norm) + 1e-6)) for g in grads]


def test_gradient_routing_step_equals_the_two_passes_by_hand():
    model = gated(lambda: BertForSequenceClassification(bert_config()))
    reference = copy.deepcopy(model)
    inputs, labels = text_inputs(), torch.tensor([0, 2, 1])
    args = (inputs["input_ids"], inputs["attention_mask"])  # BERT's first two positional arguments
    router = GradientRouter(
        model,
        torch.optim.SGD(non_gate_parameters(model), lr=LR_MAIN),
        torch.optim.SGD(gate_parameters(model), lr=LR_GATE),
        cross_entropy,
        gate_loss,
        main_clip=0.5,
        gate_clip=0.05,
    )
    result = router.step(args, labels)

    gates, backbone = gate_parameters(reference), non_gate_parameters(reference)
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    grads = torch.autograd.grad(gate_loss(reference(**inputs), labels), gates)
    with torch.no_grad():
        for p, g in zip(gates, clipped(list(grads), 0.05)):
            p -= LR_GATE * g
    after_gate_pass = {n: p.detach().clone() for n, p in reference.named_parameters()}
    changed = {n for n in start if not torch.equal(start[n], after_gate_pass[n])}
    assert changed == {n for n in start if n.endswith((".gate_attn", ".gate_mlp"))}  # the gate pass: gates only
    grads = torch.autograd.grad(cross_entropy(reference(**inputs), labels), backbone)
    with torch.no_grad():
        for p, g in zip(backbone, clipped(list(grads), 0.5)):
            p -= LR_MAIN * g

    assert result["skipped"] is False
    expected = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert changed < moved and "classifier.weight" in moved


# --- the KV cache, save and load, refusals -------------------------------------------------------------------


@torch.no_grad()
def test_gpt2_with_and_without_kv_cache_gives_the_same_logits_and_generation():
    model = gated(lambda: GPT2LMHeadModel(gpt2_config()))
    ids = text_inputs()["input_ids"]
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :3], use_cache=True)
    steps = [out.logits]
    for t in range(3, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    stock = copy.deepcopy(model)
    for layer in gated_blocks(stock):
        with torch.no_grad():
            layer.gate_attn.fill_(3.0)  # other gates: other logits, so the check above can fail
    assert not torch.allclose(stock(ids).logits, full, atol=1e-3)

    prompt = ids[:, :3]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (3, 9)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@torch.no_grad()
def test_save_pretrained_and_load_back_keeps_the_gates(family, tmp_path):
    factory, inputs_of = TASK_MODELS[family]
    model = gated(factory)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained_with_fsg(type(model), tmp_path).eval()
    assert type(loaded) is type(model)
    expected = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, expected[name], atol=0, rtol=0, msg=name)
    inputs = inputs_of()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_loading_gates_from_a_stock_checkpoint_is_refused(tmp_path):
    torch.manual_seed(0)
    BertForSequenceClassification(bert_config()).save_pretrained(tmp_path)
    with pytest.raises(FsgEndoError, match=r"no saved FSG gate bert\.encoder\.layer\.0\.gate_attn") as err:
        from_pretrained_with_fsg(BertForSequenceClassification, tmp_path)
    assert "\n" not in str(err.value)


def test_an_unknown_transformers_block_is_refused_in_one_line():
    electra = ElectraModel(ElectraConfig(**TEXT, embedding_size=HIDDEN, intermediate_size=FFN))
    with pytest.raises(FsgEndoError, match=r"transformers block ElectraLayer is not supported") as err:
        inject_fsg(electra)
    assert "\n" not in str(err.value)


def test_a_block_with_cross_attention_is_refused():
    decoder = BertModel(bert_config(is_decoder=True, add_cross_attention=True))
    with pytest.raises(FsgEndoError, match=r"BertLayer with cross-attention") as err:
        inject_fsg(decoder)
    assert "\n" not in str(err.value)


def test_gating_torch_models_never_imports_transformers():
    code = (
        "import sys, torch\n"
        "import fsg_endo\n"
        "from fsg_endo.nn.gates import inject_fsg, gated_blocks, fold_gates\n"
        "m = inject_fsg(torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16), 2))\n"
        "assert len(gated_blocks(m)) == 2 and fold_gates(m) is not None\n"
        "assert 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
