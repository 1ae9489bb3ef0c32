"""lmforge plan: every formula on numbers worked by hand (Chinchilla's own 70B point, the ZeRO
paper's 7.5B example, the 70B ZeRO-1 optimizer state), parameter counts against models built
by transformers and adapters built by peft, and the command's one-line errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lmforge import plan
from lmforge.errors import UserError
from tests.conftest import run_cli


def test_chinchilla_both_ways() -> None:
    # Chinchilla itself: 5.76e23 FLOPs -> N = sqrt(5.76e23 / 120) = sqrt(4.8e21) = 69.3B
    # parameters on D = 20 N = 1.39T tokens (the paper trained 70B on 1.4T)
    n, d = plan.chinchilla(5.76e23)
    assert n == pytest.approx(4.8e21 ** 0.5, rel=1e-12) and d == pytest.approx(20 * n, rel=1e-12)
    c, t = plan.chinchilla_compute(70e9)  # D = 1.4e12, C = 6 * 70e9 * 1.4e12 = 5.88e23
    assert (c, t) == (pytest.approx(5.88e23, rel=1e-12), pytest.approx(1.4e12, rel=1e-12))
    assert plan.chinchilla(c)[0] == pytest.approx(70e9, rel=1e-12)  # the two are inverses
    with pytest.raises(UserError, match="compute must be > 0"):
        plan.chinchilla(0)


def test_70b_adamw_zero1_on_64_gpus() -> None:
    """bf16 weights and grads, AdamW m and v in fp32 (8 bytes a parameter): 560 GB of optimizer
    state, 8.75 GB a GPU under ZeRO-1; the fp32 master copy (280 GB) is sharded with it."""
    st = plan.model_state(70e9, zero=1, gpus=64)
    assert st.optimizer == 70e9 * 8 / 64 == 8.75e9
    assert plan.model_state(70e9, zero=0, gpus=64).optimizer == 560e9
    assert (st.weights, st.grads, st.master) == (140e9, 140e9, 280e9 / 64)


@pytest.mark.parametrize("zero, gb", [(0, 120.0), (1, 31.40625), (2, 16.640625), (3, 1.875)])
def test_zero_paper_example(zero: int, gb: float) -> None:
    """ZeRO (Rajbhandari et al.), figure 1: 7.5B parameters, 64 GPUs, K = 12 bytes of optimizer
    state (fp32 master 4 + m 4 + v 4): DDP (2 + 2 + 12) 7.5 = 120 GB; P_os 2 * 7.5 + 2 * 7.5 +
    12 * 7.5 / 64 = 31.4 GB; P_os+g 2 * 7.5 + 14 * 7.5 / 64 = 16.6 GB; P_os+g+p 16 * 7.5 / 64
    = 1.875 GB."""
    assert plan.model_state(7.5e9, zero=zero, gpus=64).total == pytest.approx(gb * 1e9, rel=1e-12)


def test_lora_and_qlora_state() -> None:
    """7B base, 40M adapter parameters. LoRA: base in bf16 (14 GB) + adapters (80 MB), grads
    and AdamW state of the adapters only; QLoRA: NF4 at 4.5 bits a weight (3.9375 GB for all
    7B), or only the linear layers quantized."""
    lo = plan.model_state(7e9, method="lora", trainable=40e6)
    assert (lo.weights, lo.grads, lo.optimizer, lo.master) == (14.08e9, 80e6, 320e6, 160e6)
    q = plan.model_state(7e9, method="qlora", trainable=40e6)
    assert q.weights == pytest.approx(7e9 * 0.5625 + 80e6, rel=1e-12)
    # only the linear layers in 4 bits: 6.5B of them, the other 0.5B stay bf16
    q = plan.model_state(7e9, method="qlora", trainable=40e6, quantized=6.5e9)
    assert q.weights == pytest.approx(6.5e9 * 0.5625 + 0.5e9 * 2 + 80e6, rel=1e-12)
    assert plan.model_state(7e9, method="full", weights="fp32", grads="fp32").master == 0.0
    with pytest.raises(UserError, match="trainable parameter count"):
        plan.model_state(7e9, method="lora")
    with pytest.raises(UserError, match="zero must be"):
        plan.model_state(7e9, zero=4)


def test_preset_parameters_equal_the_built_model() -> None:
    """nano at a 1,024 vocabulary is the demo's 1,967,808 parameters: 4 blocks of attention
    4 * 192^2 and SwiGLU 3 * 192 * 512 (1,769,472), tied embeddings 1024 * 192, 9 norms of 192."""
    s = plan.shape_of_preset("nano", 1024)
    assert s.params == 1_967_808 == s.linear_params() + 1024 * 192 + 9 * 192
    assert (s.hidden, s.layers, s.heads, s.ffn, s.vocab) == (192, 4, 4, 512, 1024)


@pytest.mark.parametrize("cfg", [
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2),  # grouped-query attention
    GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),  # fused qkv
], ids=["llama-gqa", "gpt2"])
def test_parameters_and_lora_parameters_equal_transformers_and_peft(cfg) -> None:
    import warnings

    from peft import LoraConfig, get_peft_model

    s = plan.shape_of_config(cfg)
    model = AutoModelForCausalLM.from_config(cfg)
    assert s.params == sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note that GPT-2's Conv1D is fan-in-fan-out
        peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert s.lora_params(4) == trainable


def test_activations_worked_by_hand() -> None:
    """hidden 4, 2 layers, 2 heads (kv 2, head dim 2), SwiGLU ffn 8, vocab 10; bf16. Per token
    and layer: norms 6 * 4, q 4, k and v 2 * 4, attention output 4, MLP 4 * 8: 72 values, 144
    bytes, plus fp32 1/rms for 2 norms (8) and log-sum-exp for 2 heads (8): 160. seq 3 x
    micro-batch 2 = 6 tokens: a block 960; rotary cos and sin 2 * 3 * 2 * 2 = 24, once. Head:
    6 * (final norm 3 * 4 * 2 + its 1/rms 4 + fp32 logits 10 * 4) = 408.
    No checkpointing: 2 * 960 + 24 + 408 = 2,352. Checkpointed: block inputs 2 * 4 * 2 * 6 =
    96, one block rebuilt 960 + 24, head 408: 1,488. Unfused attention: 78 values and no
    log-sum-exp, 164 a token and layer: 2 * 984 + 24 + 408 = 2,400."""
    s = plan.Shape(params=0, hidden=4, layers=2, heads=2, kv_heads=2, ffn=8, vocab=10)
    assert plan.activation_bytes_per_token_layer(s, 3) == 160
    assert plan.activations(s, 3, 2, checkpointing=False) == 2352
    assert plan.activation_parts(s, 3, 2, checkpointing=True) == \
        {"blocks": 96, "recompute": 984, "head": 408}
    assert plan.activations(s, 3, 2, checkpointing=False, fused_attention=False) == 2400


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_equal_what_autograd_saves(checkpointing: bool) -> None:
    """The tensors a Hugging Face Llama (fp32, SDPA, grouped-query attention) saves for
    backward in one training forward, each storage counted once, equal the formula to the
    byte but for the 4-byte loss scalar. Checkpointed, the block rebuilt in backward is not
    among them (it exists only during backward)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=88, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = plan.saved_bytes(model, torch.randint(0, 96, (3, 20)))
    parts = plan.activation_parts(plan.shape_of_config(cfg), 20, 3, checkpointing=checkpointing,
                                  act_bytes=4.0)
    assert got == parts["blocks"] + parts["head"] + 4


def test_bubble_tensor_parallel_and_storage() -> None:
    assert plan.pipeline_bubble(4, 12) == 3 / 15 and plan.pipeline_bubble(1, 8) == 0
    s = plan.Shape(params=0, hidden=4, layers=2, heads=2, kv_heads=2, ffn=8, vocab=10)
    # 2 layers x 4 all-reduces x (3 * 2 * 4 values * 2 bytes = 48) x 2 (4 - 1) / 4 = 576
    assert plan.tp_bytes_per_step(s, 3, 2, 4) == 576 and plan.tp_bytes_per_step(s, 3, 2, 1) == 0
    assert plan.token_storage(1e9, 50257) == ("uint16", 2e9)  # GPT-2's vocabulary fits 16 bits
    assert plan.token_storage(1e9, 128256) == ("uint32", 4e9)  # Llama 3's does not


def test_parse_count() -> None:
    assert [plan.parse_count(x) for x in ("7e9", "70B", "124m", "1.5T", "2_000")] == \
        [7e9, 70e9, 124e6, 1.5e12, 2000.0]
    assert plan.parse_count("nano") is None and plan.parse_count("-3") is None


def test_cli_tables_and_one_line_errors(tmp_path) -> None:
    r = run_cli("plan", "70B", "--gpus", "64", "--method", "full")
    assert r.returncode == 0, r.stderr
    zero1 = next(x for x in r.stdout.splitlines() if x.startswith("| full | ZeRO-1 |"))
    assert "| 8.75 GB |" in zero1  # the optimizer column
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4)
    cfg.save_pretrained(tmp_path)
    r = run_cli("plan", str(tmp_path / "config.json"), "--gpus", "2", "--seq", "16")
    assert r.returncode == 0 and "| qlora | ZeRO-3 / FSDP |" in r.stdout
    r = run_cli("plan", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not a preset" in r.stderr and "Traceback" not in r.stderr
