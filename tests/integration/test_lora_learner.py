"""The DeepSpeed learner with LoRA on Ray: steps against plain torch + peft, weights handed out merged, adapter-only
checkpoints that resume exactly, and the export (merged model plus peft adapter).

Real Ray, real DeepSpeed on CPU (gloo), the tiny Qwen2 model. The optimizer is AdamW with lr = eps far above every
gradient, so an update is (bias-corrected) first moment itself: at the first step the gradient, at the second a fixed
mix of both steps' gradients; equal updates mean equal gradients. Each group is started once per module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from support.learner import make_batch

from pear_ray.actors.learner import LearnerGroup
from pear_ray.config import LearnerResources, LoraConfig
from pear_ray.data import schema
from pear_ray.objectives import Grpo, PearSft

LORA = LoraConfig(r=4, alpha=8.0)
ADAM_AS_GRADIENT = dict(lr=1e4, eps=1e4, grad_clip=0.0, weight_decay=0.0, seed=0)  # update = m_hat
SFT = PearSft(level="none")  # canonical SFT: the response tokens' mean negative log-likelihood
BATCHES = [make_batch(5, seed=21), make_batch(5, seed=22)]
RL = Grpo(kl_coef=0.1, tis_cap=1.5, loss_aggregation="sequence-mean")
RL_BATCH = make_batch(4, seed=23)


def start(model_dir: Path, ranks: int = 1, zero_stage: int = 0, budget: int | None = None,
          lora: LoraConfig = LORA) -> LearnerGroup:
    resources = LearnerResources(num_ranks=ranks, zero_stage=zero_stage, num_cpus=0.25,
                                 max_tokens_per_micro_batch=budget)
    return LearnerGroup(model_dir, resources, lora=lora, **ADAM_AS_GRADIENT)


def adapter(export: str | Path) -> dict[str, torch.Tensor]:
    """The adapter weights an export holds (peft's file), by peft's saved names."""
    return load_file(str(Path(export) / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def trained(ray_cluster, tiny_model_dir, tmp_path_factory):
    """One rank, ZeRO-0: the adapter exported before and after each of two SFT steps, the steps' stats and the
    weights handed out at the end."""
    folder = tmp_path_factory.mktemp("lora")
    group = start(tiny_model_dir)
    try:
        exports, stats = [group.export_hf(folder / "export0")], []
        for index, batch in enumerate(BATCHES, 1):
            stats.append(group.step(ray.put(batch), SFT))
            exports.append(group.export_hf(folder / f"export{index}"))
        yield {"exports": exports, "stats": stats, "weights": ray.get(group.weights_ref()), "group": group}
    finally:
        group.shutdown()


def plain_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def reference_steps(model_dir: Path) -> list[tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Plain torch + peft, one unpadded row at a time: (loss, adapter before, adapter after) per step of BATCHES,
    from the learner's seed and init order (seed, load, wrap)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(ADAM_AS_GRADIENT["seed"])
    model = get_peft_model(plain_model(model_dir), PeftLoraConfig(
        r=LORA.r, lora_alpha=LORA.alpha, target_modules=LORA.target_modules, lora_dropout=0.0))
    trained = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=ADAM_AS_GRADIENT["lr"], eps=ADAM_AS_GRADIENT["eps"], weight_decay=0.0)
    steps = []
    for batch in BATCHES:
        before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        total, tokens = 0.0, 0
        for prompt, response in zip(batch.column(schema.PROMPT_IDS).to_pylist(),
                                    batch.column(schema.RESPONSE_IDS).to_pylist()):
            ids = torch.tensor([prompt + response])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None])
            total = total - logp[len(prompt) - 1:].sum()
            tokens += len(response)
        loss = total / tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps.append((float(loss.detach()), before, {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}))
    return steps


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_lora_sft_steps_equal_plain_torch_and_peft(trained, tiny_model_dir):
    """The same init (A from the seed, B zero), the same losses, the same adapter updates (so gradients)."""
    exports, steps = trained["exports"], reference_steps(tiny_model_dir)
    assert max_abs_diff(adapter(exports[0]), steps[0][1]) == 0.0
    for index, (loss, before, after) in enumerate(steps):
        assert trained["stats"][index]["loss"] == pytest.approx(loss, abs=1e-6)
        ours = {k: adapter(exports[index + 1])[k] - adapter(exports[index])[k] for k in before}
        theirs = {k: after[k] - before[k] for k in before}
        assert max_abs_diff(ours, theirs) < 1e-6
        assert max(float(v.abs().max()) for v in ours.values()) > 1e-3  # the adapters did move


def test_only_the_adapters_train_and_the_merge_is_peft_merge_and_unload(trained, tiny_model_dir):
    """The weights handed out are the start model's with the trained adapter merged, under the plain names: peft's
    merge_and_unload of the exported adapter on the start model, bit for bit (so the base weights never moved)."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(plain_model(tiny_model_dir), trained["exports"][-1] + "/adapter")
    expected = merged.merge_and_unload().state_dict()
    weights = trained["weights"]
    assert max_abs_diff(weights, expected) == 0.0
    start = plain_model(tiny_model_dir).state_dict()
    changed = {name for name in weights if not torch.equal(weights[name], start[name])}
    assert changed and all(name.rpartition(".")[0].rpartition(".")[2] in LORA.target_modules for name in changed)


def test_exports_load_merged_and_as_a_peft_adapter(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export = trained["exports"][-1]
    assert max_abs_diff(AutoModelForCausalLM.from_pretrained(export).state_dict(), trained["weights"]) == 0.0
    model = PeftModel.from_pretrained(plain_model(tiny_model_dir), f"{export}/adapter").eval()
    prompt = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
        merged = plain_model(export).generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7) and torch.equal(out, merged)


def test_checkpoint_holds_only_the_adapters_and_resumes_exactly(trained, tiny_model_dir, tmp_path):
    """Two ranks, ZeRO-2, packed micro-batches, an SFT then a GRPO step: the first step equals the one-rank padded
    one, the checkpoint after it holds the adapters alone, and a new group resumed from it ends where the
    uninterrupted one did."""
    ckpt = tmp_path / "ckpt"
    group = start(tiny_model_dir, ranks=2, zero_stage=2, budget=24)
    try:
        first = group.step(ray.put(BATCHES[0]), SFT)
        tag = group.save_checkpoint(ckpt)
        rl = group.step(ray.put(RL_BATCH), RL)
        uninterrupted = ray.get(group.weights_ref())
    finally:
        group.shutdown()
    module = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all(".lora_A." in name or ".lora_B." in name for name in module)
    assert first["loss"] == pytest.approx(trained["stats"][0]["loss"], abs=1e-6)
    one_rank = adapter(trained["exports"][1])
    assert max_abs_diff({name.replace(".default", ""): value for name, value in module.items()}, one_rank) < 1e-6
    full = (tiny_model_dir / "model.safetensors").stat().st_size
    assert sum(file.stat().st_size for file in (ckpt / tag).iterdir()) < full / 2

    resumed = start(tiny_model_dir, ranks=2, zero_stage=2, budget=24)
    try:
        resumed.load_checkpoint(ckpt)
        assert resumed.step(ray.put(RL_BATCH), RL) == rl
        assert max_abs_diff(ray.get(resumed.weights_ref()), uninterrupted) == 0.0
    finally:
        resumed.shutdown()


def test_adapter_dropout_is_in_training_forwards_only(ray_cluster, tiny_model_dir):
    """With dropout the step's loss is not the loss of the log-probs at the same weights, which stay deterministic;
    an on-policy step (its logp_old from the dropout-free pass) runs too. Under ZeRO-1, the stage no other test
    here takes."""
    group = start(tiny_model_dir, zero_stage=1, lora=LORA.model_copy(update={"dropout": 0.5}))
    try:
        group.step(ray.put(BATCHES[0]), SFT)  # B is zero at first, so dropout shows from the second forward on
        batch = ray.put(BATCHES[1])
        logprobs = [ray.get(group.logprobs(batch)).flatten().to_numpy() for _ in range(2)]
        assert (logprobs[0] == logprobs[1]).all()
        assert group.step(batch, SFT)["loss"] != pytest.approx(float(-logprobs[0].mean()), abs=1e-4)
        assert group.step(ray.put(RL_BATCH), RL)["step"] == 3
    finally:
        group.shutdown()


@pytest.mark.slow  # about 20 s; test_checkpoint_holds_only_the_adapters_and_resumes_exactly covers ZeRO-2
def test_zero_3_ends_as_zero_2_and_its_adapter_checkpoint_resumes_exactly(ray_cluster, tiny_model_dir, tmp_path):
    """Two ranks, an SFT then a GRPO step: under ZeRO-3 (every parameter partitioned, frozen or adapter) the losses,
    the merged weights handed out, the adapters a sync sends and the exported adapter are ZeRO-2's; a group
    resumed from the ZeRO-3 checkpoint taken between the steps ends where the uninterrupted one did."""
    runs = {}
    for stage in (2, 3):
        group = start(tiny_model_dir, ranks=2, zero_stage=stage)
        try:
            sft = group.step(ray.put(BATCHES[0]), SFT)
            tag = group.save_checkpoint(tmp_path / f"ckpt{stage}")
            rl = group.step(ray.put(RL_BATCH), RL)
            method, sent = group.policy_update()
            runs[stage] = dict(sft=sft["loss"], rl=rl, weights=ray.get(group.weights_ref()), method=method,
                               sent=ray.get(sent), nbytes=group.policy_nbytes,
                               export=adapter(group.export_hf(tmp_path / f"export{stage}")))
        finally:
            group.shutdown()
    zero2, zero3 = runs[2], runs[3]
    assert zero3["sft"] == pytest.approx(zero2["sft"], abs=1e-6)
    assert zero3["rl"]["loss"] == pytest.approx(zero2["rl"]["loss"], abs=1e-6)
    assert max_abs_diff(zero3["weights"], zero2["weights"]) < 1e-6
    assert zero3["method"] == "update_adapter" and zero3["nbytes"] == zero2["nbytes"] == zero3["sent"].nbytes
    assert max_abs_diff(zero3["sent"].tensors, zero2["sent"].tensors) < 1e-6
    assert max_abs_diff(zero3["export"], zero2["export"]) < 1e-6
    assert any(float(value.abs().max()) > 0 for name, value in zero3["export"].items() if "lora_B" in name)
    resumed = start(tiny_model_dir, ranks=2, zero_stage=3)
    try:
        resumed.load_checkpoint(tmp_path / "ckpt3", tag)
        assert resumed.step(ray.put(RL_BATCH), RL)["loss"] == zero3["rl"]["loss"]
        assert max_abs_diff(ray.get(resumed.weights_ref()), zero3["weights"]) == 0.0
    finally:
        resumed.shutdown()
