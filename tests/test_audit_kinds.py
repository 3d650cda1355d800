"""The audit's update kinds: the one lookup every audit module goes through, and the full fine-tune's contexts."""

import pytest
import torch
from torch import nn

from trap2_hf.audit.kinds import AUDITED_KINDS, audited_kind
from trap2_hf.audit.auditor import Auditor
from trap2_hf.audit.run import run_audit
from trap2_hf.audit.task_vectors import full_task_vector


def test_an_unknown_target_is_refused_by_name_with_the_kinds_that_exist():
    message = r"Unknown target 'lora'; use 'adapter' \(PEFT adapters\) or 'full' \(fine-tuned states\)\."
    with pytest.raises(ValueError, match=message):
        audited_kind("lora")
    with pytest.raises(ValueError, match=message):
        run_audit(nn.Linear(2, 2), [], "t", {}, None, {"u": {}}, target="lora")
    with pytest.raises(ValueError, match=message):
        Auditor(nn.Linear(2, 2), [], "lora", {}, seed=0)
    assert list(AUDITED_KINDS) == ["adapter", "full"]


def test_a_full_fine_tune_alone_and_rescaled_holds_theta0_plus_s_delta_and_restores_it_exactly():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    theta0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    finetuned = {name: t + torch.randn_like(t) for name, t in theta0.items()}
    kind = audited_kind("full")
    vector = full_task_vector(model, finetuned)
    assert kind.describe(finetuned) == "<fine-tuned state: 2 tensors>"
    with kind.alone(model, finetuned, lambda: vector):
        torch.testing.assert_close(model.weight.detach(), finetuned["weight"])
    for scale in (0.0, 0.5, 2.0):
        with kind.rescaled(model, finetuned, lambda: vector, scale):
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.detach(), theta0[name] + scale * (finetuned[name] - theta0[name]))
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), theta0[name])
    with kind.without_update(model):
        assert torch.equal(model.weight.detach(), theta0["weight"])


# A metric that moves with any change of the weights (the mean probability of the right next token).
TASKS_FILE = '''
import torch
from trap2_hf.audit import AuditTask

def get_tasks(model, tokenizer):
    ids = torch.arange(24).view(2, 12) % 48

    def make(name, shift):
        def evaluate(m, split):
            probs = m(input_ids=ids).logits.float().softmax(-1)
            return float(probs.gather(-1, ((ids + shift) % 48).unsqueeze(-1)).mean())
        return AuditTask(name, evaluate, chance=1 / 48)

    return [make("t0", 1), make("t1", 2)]
'''


def test_the_cli_reads_full_fine_tunes_from_model_folders_as_the_audit_is_given_them(tmp_path, capsys):
    """`trap2 audit --target full`: each folder becomes a fine-tuned state, and the audit of those states
    matches the audit of the same states given in process."""
    import json

    from conftest import tiny_llama
    from trap2_hf.audit import run_audit
    from trap2_hf.cli import main

    base_dir, out_dir = str(tmp_path / "base"), str(tmp_path / "audit")
    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(base_dir)
    states = {}
    for seed, name in enumerate(("prot", "t1"), start=1):
        torch.manual_seed(seed)
        tuned = tiny_llama()
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.05 * torch.randn_like(p))
        tuned.save_pretrained(str(tmp_path / name))
        states[name] = {k: p.detach().clone() for k, p in tuned.named_parameters()}
    (tmp_path / "tasks.py").write_text(TASKS_FILE)
    code = main([
        "audit", "--target", "full", "--base_model", base_dir, "--tasks", str(tmp_path / "tasks.py"),
        "--protected_task", "t0", "--protected", str(tmp_path / "prot"), "--other", f"t1={tmp_path / 't1'}",
        "--methods", "task_arithmetic", "--modes", "average", "--sweep_scales", "0", "1", "--device", "cpu",
        "--output_dir", out_dir, "--no_progress",
    ])
    assert code == 0
    capsys.readouterr()
    with open(f"{out_dir}/audit.json") as f:
        results = json.load(f)
    tensors = len(states["prot"])
    assert results["config"]["updates"] == {
        "protected": f"<fine-tuned state: {tensors} tensors>", "unprotected": None,
        "others": {"t1": f"<fine-tuned state: {tensors} tensors>"},
    }
    namespace = {}
    exec(TASKS_FILE, namespace)
    direct = run_audit(
        base, namespace["get_tasks"](base, None), "t0", states["prot"], None, {"t1": states["t1"]}, target="full",
        methods=["task_arithmetic"], modes=("average",), sweep_scales=(0.0, 1.0), progress=False,
    )
    curve = results["rescale_curve"]["protected"]
    assert curve[0] == pytest.approx(results["base"]["t0"]) and curve[1] != pytest.approx(curve[0])  # it moved
    assert curve == pytest.approx(direct["rescale_curve"]["protected"], rel=1e-6)
    assert results["methods"][0]["protected"] == pytest.approx(direct["methods"][0]["protected"], rel=1e-6)
