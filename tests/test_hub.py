"""Hub round trip of protected adapters, against the local Hub in hub_server.py (no network)."""

import json
import logging
import os

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from conftest import text_dataset, tiny_llama, tiny_tokenizer, token_dataset
from hub_server import READ_TOKEN, WRITE_TOKEN, hub_server  # noqa: F401 -- the fixture
from trap2_hf import Trap2Trainer, Trap2TrainingArguments, load_protected_adapter
from trap2_hf._warnings import XET_FALLBACK_NOTICE
from trap2_hf.cli import main as trap2_main
from trap2_hf.hub import BaseModelMismatchError, ChecksumMismatchError, HubPushError, ProtectionCardError
from trap2_hf.release.card import render_card

PICKLE_NAMES = (".bin", ".pkl", ".pt", ".pth", ".pickle")
# A `trap2 audit` report (audit.json), trimmed to what the card reads.
AUDIT = {
    "protected_task": "copy",
    "tasks": ["copy", "reverse"],
    "base": {"copy": 0.02, "reverse": 0.03},
    "chance": {"copy": 0.021, "reverse": 0.021},
    "finetuned": {"copy": 0.92, "reverse": 0.8},
    "standalone": {"protected": 0.91, "unprotected": 0.92},
    "rescale_curve": {"scales": [0.5, 1.0, 1.5], "protected": [0.1, 0.91, 0.05], "unprotected": [0.8, 0.92, 0.85]},
    "methods": [
        {
            "method": "task_arithmetic",
            "mode": "best",
            "params": {"weight": 0.3},
            "unprotected_params": {"weight": 0.3},
            "protected": {"copy": 0.05, "reverse": 0.6, "average": 0.33},
            "unprotected": {"copy": 0.7, "reverse": 0.65, "average": 0.68},
        }
    ],
    "skipped": [],
}
# The short form: one number for the base model and for chance.
SHORT_AUDIT = {
    "protected_task": "copy",
    "base": 0.02,
    "chance": 0.021,
    "standalone": {"protected": 0.91, "unprotected": 0.92},
    "methods": [
        {
            "method": "ties",
            "mode": "average",
            "params": {"density": 0.2},
            "protected": {"copy": 0.04, "average": 0.3},
            "unprotected": None,
        }
    ],
}


def lora_model(seed=0):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(tiny_llama(seed), config)


def make_trainer(output_dir, hub_api=None, **overrides):
    args = dict(
        output_dir=output_dir,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        logging_steps=100,
        save_strategy="no",
        trap_lambda=0.005,
        trap_weighting="inv_sqrt",
    )
    args.update(overrides)
    args = Trap2TrainingArguments(**args)
    return Trap2Trainer(model=lora_model(), args=args, train_dataset=token_dataset(8), hub_api=hub_api)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A protected LoRA adapter trained for two steps, not yet saved or pushed."""
    trainer = make_trainer(str(tmp_path_factory.mktemp("trained") / "out"))
    trainer.train()
    return trainer


def adapter_weights(model):
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def assert_same_weights(expected, model):
    found = adapter_weights(model)
    assert sorted(found) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(found[key], value), key


def all_local_files(folder):
    return {
        os.path.relpath(os.path.join(root, name), folder): os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
    }


# ----------------------------------------------------------------------------- the round trip
def test_push_from_trainer_and_pull_back(hub_server, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    out = str(tmp_path / "out")
    trainer = make_trainer(
        out,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id="tiny-protected",
        hub_token=WRITE_TOKEN,
        hub_strategy="checkpoint",
    )
    assert trainer.hub_model_id == "alice/tiny-protected"
    trainer.train()
    trainer.push_to_hub(license="mit", audit=AUDIT, audit_plot=str(_png(tmp_path)))
    trained = adapter_weights(trainer.model)
    repo = hub_server.files("alice/tiny-protected")

    # What was uploaded: weights as safetensors, the card, json; never a pickle, never the token.
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors", "training_args.json", "audit.png"):
        assert name in repo, sorted(repo)
    assert "last-checkpoint/adapter_model.safetensors" in repo
    assert b"## Protected update: Trap" in repo["last-checkpoint/README.md"]  # checkpoint pushes carry the card
    assert not [name for name in repo if name.endswith(PICKLE_NAMES)], sorted(repo)
    for name, data in repo.items():
        assert WRITE_TOKEN.encode() not in data, name
    assert not [k for k in json.loads(repo["training_args.json"]) if "token" in k.lower()]
    local = all_local_files(out)
    assert not [name for name in local if os.path.basename(name) == "training_args.bin"], sorted(local)
    for name, path in local.items():
        with open(path, "rb") as f:
            assert WRITE_TOKEN.encode() not in f.read(), name

    # Byte for byte: the Hub holds exactly the local files.
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors", "audit.json"):
        with open(os.path.join(out, name), "rb") as f:
            assert repo[name] == f.read(), name

    # The card: parsed by huggingface_hub, with the settings the training used.
    card_path = tmp_path / "README.md"
    card_path.write_bytes(repo["README.md"])
    card = ModelCard.load(card_path)
    assert card.data.library_name == "peft"
    assert card.data.license == "mit"
    assert {"trap2", "unmergeable", "lora"} <= set(card.data.tags)
    block = card.data.to_dict()["trap2"]
    assert {k: block[k] for k in trainer.args.trap_settings_dict()} == trainer.args.trap_settings_dict()
    assert block["trap_lambda"] == 0.005 and block["trap_weighting"] == "inv_sqrt"
    assert block["sha256"]["adapter_model.safetensors"] == _sha256(repo["adapter_model.safetensors"])
    metrics = {(r.dataset_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert metrics[("copy", "task_arithmetic merge (best), protected update")] == 0.05
    assert metrics[("copy", "standalone, unprotected update")] == 0.92
    assert "| task_arithmetic | best | w=0.3 | 0.050 | 0.700 | ✓ | 0.330 | 0.680 |" in card.text  # the audit's table
    assert "![Merge audit" in card.text and "(audit.png)" in card.text
    assert "This model is a fine-tuned version of" in card.text  # the Trainer's own card is kept

    # Pull: the checked loader and plain PEFT give the trained weights.
    model, facts = load_protected_adapter(tiny_llama(), "alice/tiny-protected")
    assert_same_weights(trained, model)
    assert facts["trap_lambda"] == 0.005 and facts["sha256"] == block["sha256"] and facts["license"] == "mit"
    assert facts["revision"] == hub_server.repos["alice/tiny-protected"]["commits"][-1][0]
    assert_same_weights(trained, PeftModel.from_pretrained(tiny_llama(), "alice/tiny-protected"))
    assert all(auth in (None, f"Bearer {WRITE_TOKEN}") for _, _, auth in hub_server.requests)
    # Nor in any log line or console output of the whole round trip.
    captured = capsys.readouterr()
    assert caplog.text and WRITE_TOKEN not in caplog.text
    assert WRITE_TOKEN not in captured.out + captured.err


def test_trl_rewrites_keep_the_protection(hub_server, tmp_path):
    from trap2_hf import Trap2SFTConfig, Trap2SFTTrainer

    out = str(tmp_path / "sft")
    config = Trap2SFTConfig(
        output_dir=out, max_steps=1, per_device_train_batch_size=4, use_cpu=True, report_to="none", save_steps=1,
        hub_model_id="tiny-sft", hub_token=WRITE_TOKEN,
    )
    trainer = Trap2SFTTrainer(
        model=tiny_llama(),
        args=config,
        train_dataset=text_dataset(4),
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )

    def protection_sections(folder):
        with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
            text = f.read()
        assert "It has been trained using [TRL]" in text or folder.endswith("checkpoint-1"), folder
        return text.count("## Protected update: Trap²")

    trainer.train()  # TRL re-writes README.md at every checkpoint
    assert protection_sections(out) == 1 and protection_sections(os.path.join(out, "checkpoint-1")) == 1
    trainer.push_to_hub()  # ... and again here
    assert protection_sections(out) == 1
    readme = hub_server.files("alice/tiny-sft")["README.md"].decode()
    assert "It has been trained using [TRL]" in readme and "## Protected update: Trap²" in readme
    model, facts = load_protected_adapter(tiny_llama(), "alice/tiny-sft")
    assert facts["trap_weighting"] == "inv_sqrt"  # Trap2SFTConfig's default, as trained
    assert_same_weights(adapter_weights(trainer.model), model)


# ----------------------------------------------------------------------------- failures
def test_tampered_adapter_fails_the_checksum(trained, hub_server, tmp_path, monkeypatch):
    out = str(tmp_path / "copy")
    trained.save_model(out)
    load_protected_adapter(tiny_llama(), out)  # intact: loads
    weights = os.path.join(out, "adapter_model.safetensors")
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, weights)
    with pytest.raises(ChecksumMismatchError, match=r"adapter_model\.safetensors .* does not match the sha256"):
        load_protected_adapter(tiny_llama(), out)

    # The same on the Hub: a commit that swaps the weights behind the card's back.
    monkeypatch.setattr(trained.args, "hub_model_id", "tampered")
    monkeypatch.setattr(trained.args, "hub_token", WRITE_TOKEN)
    monkeypatch.setattr(trained, "hub_model_id", None)
    trained.push_to_hub()
    oid, files = hub_server.repos["alice/tampered"]["commits"][-1]
    with open(weights, "rb") as f:
        tampered = {**files, "adapter_model.safetensors": f.read()}
    hub_server.repos["alice/tampered"]["commits"].append(("f" * 40, tampered))
    with pytest.raises(ChecksumMismatchError, match="does not match"):
        load_protected_adapter(tiny_llama(), "alice/tampered")
    load_protected_adapter(tiny_llama(), "alice/tampered", revision=oid)  # the pushed commit is intact

    os.remove(weights)  # a missing file is named as such
    with pytest.raises(ChecksumMismatchError, match=r"adapter_model\.safetensors of .* is missing, but the model card"):
        load_protected_adapter(tiny_llama(), out)


def test_cards_without_a_valid_trap2_block_fail_clearly(trained, tmp_path):
    out = str(tmp_path / "copy")
    trained.save_model(out)
    card = os.path.join(out, "README.md")
    with open(card, encoding="utf-8") as f:
        text = f.read()

    with open(card, "w", encoding="utf-8") as f:
        f.write("---\nlibrary_name: peft\n---\n# An adapter\n")
    with pytest.raises(ProtectionCardError, match="no `trap2` block"):
        load_protected_adapter(tiny_llama(), out)

    with open(card, "w", encoding="utf-8") as f:
        f.write(text.replace("trap_lambda: 0.005", "trap_lambda: -1.0"))
    with pytest.raises(ProtectionCardError, match="malformed: trap_lambda must be >= 0, got -1.0"):
        load_protected_adapter(tiny_llama(), out)

    with open(card, "w", encoding="utf-8") as f:
        f.write(text.replace("  sha256:\n", "  checksums:\n"))
    with pytest.raises(ProtectionCardError, match="malformed: missing sha256"):
        load_protected_adapter(tiny_llama(), out)

    os.remove(card)
    with pytest.raises(ProtectionCardError, match="has no README.md model card"):
        load_protected_adapter(tiny_llama(), out)
    assert_same_weights(adapter_weights(trained.model), PeftModel.from_pretrained(tiny_llama(), out))


def test_a_different_base_model_is_refused(trained, tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = str(tmp_path / "copy")
    monkeypatch.setattr(trained, "_trap_card_options", {})
    trained.create_model_card(base_model="org/tiny-base")
    trained.save_model(out)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(BaseModelMismatchError, match="hidden_size: card 32, model 64"):
        load_protected_adapter(wider, out)
    other = tiny_llama()
    other.config._name_or_path = "org/other-base"
    with pytest.raises(BaseModelMismatchError, match="trained on base model 'org/tiny-base'"):
        load_protected_adapter(other, out)
    load_protected_adapter(other, out, check_base_model=False)


def test_no_token_or_no_write_access_fails_clearly_and_keeps_the_save(trained, hub_server, monkeypatch):
    out = trained.args.output_dir
    monkeypatch.setattr(trained.args, "hub_model_id", "no-token")
    monkeypatch.setattr(trained.args, "hub_token", None)
    monkeypatch.setattr(trained, "hub_model_id", None)
    with pytest.raises(HubPushError, match="no token found. Log in with `hf auth login`"):
        trained.push_to_hub()
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    load_protected_adapter(tiny_llama(), out)  # the local save is complete and checked

    monkeypatch.setattr(trained.args, "hub_token", READ_TOKEN)
    with pytest.raises(HubPushError, match="no write access"):
        trained.push_to_hub()
    monkeypatch.setattr(trained.args, "hub_token", "hf_revoked_0123456789")
    with pytest.raises(HubPushError, match="token was rejected"):
        trained.push_to_hub()
    assert hub_server.repos == {}
    with pytest.raises(HubPushError, match="no token found"):  # caught before training starts
        make_trainer(out, push_to_hub=True, hub_model_id="early")


def test_an_interrupted_upload_can_be_rerun(trained, hub_server, monkeypatch):
    monkeypatch.setattr(trained.args, "hub_model_id", "flaky")
    monkeypatch.setattr(trained.args, "hub_token", WRITE_TOKEN)
    monkeypatch.setattr(trained, "hub_model_id", None)
    hub_server.fail_commits = 1
    with pytest.raises(HubPushError, match="Nothing is lost"):
        trained.push_to_hub()
    assert "adapter_model.safetensors" not in hub_server.files("alice/flaky")
    trained.push_to_hub()
    repo = hub_server.files("alice/flaky")
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(trained.args.output_dir, name), "rb") as f:
            assert repo[name] == f.read(), name
    commits = len(hub_server.repos["alice/flaky"]["commits"])
    trained.push_to_hub()  # nothing changed: nothing re-uploaded
    assert len(hub_server.repos["alice/flaky"]["commits"]) == commits
    load_protected_adapter(tiny_llama(), "alice/flaky")


def test_a_push_with_hf_xet_installed_prints_no_fallback_notice(trained, hub_server, monkeypatch, caplog):
    """huggingface_hub warns that open files go over HTTP, not xet, on every push: expected, so not shown."""
    from huggingface_hub import _commit_api

    monkeypatch.setattr(_commit_api, "is_xet_available", lambda: True)  # as with hf_xet installed
    monkeypatch.setattr(trained.args, "hub_model_id", "xet-installed")
    monkeypatch.setattr(trained.args, "hub_token", WRITE_TOKEN)
    monkeypatch.setattr(trained, "hub_model_id", None)
    caplog.set_level(logging.WARNING)
    trained.push_to_hub()
    assert "adapter_model.safetensors" in hub_server.files("alice/xet-installed")
    assert not [r for r in caplog.records if "Xet Storage" in r.getMessage()]
    logging.getLogger("huggingface_hub._commit_api").warning(XET_FALLBACK_NOTICE)  # the filter left with the push
    assert [r for r in caplog.records if "Xet Storage" in r.getMessage()]


def test_pushes_go_through_the_hub_api_given(hub_server, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    api = HfApi(endpoint=hub_server.endpoint)
    trainer = make_trainer(str(tmp_path / "out"), api, push_to_hub=True, hub_model_id="injected", hub_token=WRITE_TOKEN)
    trainer.push_to_hub()
    assert "adapter_model.safetensors" in hub_server.files("alice/injected")


def test_a_crash_while_saving_leaves_no_folder_that_looks_complete(trained, tmp_path, monkeypatch):
    import trap2_hf.release.mixin as mixin

    out = str(tmp_path / "copy")
    trained.save_model(out)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mixin, "write_card", crash)
    with pytest.raises(OSError, match="disk full"):
        trained.save_model(out)
    with pytest.raises(ProtectionCardError, match="no README.md"):
        load_protected_adapter(tiny_llama(), out)
    assert not [n for n in os.listdir(out) if n.startswith(".trap2")]
    monkeypatch.undo()
    trained.save_model(out)
    load_protected_adapter(tiny_llama(), out)


def test_a_full_fine_tune_is_saved_with_its_card(tmp_path):
    out = str(tmp_path / "full")
    args = Trap2TrainingArguments(output_dir=out, use_cpu=True, report_to="none", trap_target="full")
    Trap2Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset(4)).save_model()
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.library_name == "transformers" and "full" in card.data.tags
    block = card.data.to_dict()["trap2"]
    assert block["update"] == "full" and {"config.json", "model.safetensors"} <= set(block["sha256"])
    assert not [n for n in os.listdir(out) if n.endswith(PICKLE_NAMES)]
    with pytest.raises(ProtectionCardError, match="not a PEFT adapter"):
        load_protected_adapter(tiny_llama(), out)


# ----------------------------------------------------------------------------- trap2 card
def test_card_cli_for_an_adapter_trained_elsewhere(hub_server, tmp_path, monkeypatch, capsys):
    folder = str(tmp_path / "elsewhere")
    model = lora_model(seed=3)
    model.save_pretrained(folder)
    assert trap2_main(["card", folder]) == 2
    assert "--trap_lambda" in capsys.readouterr().err

    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps(SHORT_AUDIT))
    argv = ["card", folder, "--trap_lambda", "0.003", "--trap_weighting", "inv_sqrt", "--base_model", "org/tiny",
            "--license", "apache-2.0", "--audit", str(audit), "--audit_plot", str(_png(tmp_path))]
    assert trap2_main(argv) == 0
    card = ModelCard.load(os.path.join(folder, "README.md"))
    block = card.data.to_dict()["trap2"]
    assert block["trap_lambda"] == 0.003 and block["trap_weighting"] == "inv_sqrt" and block["trap_margin"] == 0.05
    assert card.data.base_model == "org/tiny" and card.data.license == "apache-2.0"
    assert os.path.isfile(os.path.join(folder, "audit.png"))
    metrics = {(r.dataset_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert metrics == {
        ("copy", "standalone, protected update"): 0.91,
        ("copy", "standalone, unprotected update"): 0.92,
        ("copy", "base model"): 0.02,
        ("copy", "chance"): 0.021,
        ("copy", "ties merge (average), protected update"): 0.04,
        ("merged-tasks-average", "ties merge (average), protected update"): 0.3,
    }
    assert "| ties | average | density=0.2 | 0.04 | – | 0.3 | – |" in card.text

    # Refresh: the settings come from the card, the flags override them (--force: the card records them); then
    # push with HF_TOKEN.
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    assert trap2_main(["card", folder, "--trap_margin", "0.1", "--force", "--push", "elsewhere"]) == 0
    block = ModelCard.load(os.path.join(folder, "README.md")).data.to_dict()["trap2"]
    assert block["trap_lambda"] == 0.003 and block["trap_margin"] == 0.1
    repo = hub_server.files("alice/elsewhere")
    assert {"README.md", "adapter_model.safetensors", "audit.png", "audit.json"} <= set(repo)
    assert 'load_protected_adapter(base, "alice/elsewhere")' in repo["README.md"].decode()
    model_back, facts = load_protected_adapter(tiny_llama(), "alice/elsewhere")
    assert facts["trap_margin"] == 0.1
    assert_same_weights(adapter_weights(model), model_back)


def test_render_card_replaces_only_its_own_section():
    protection = {"update": "lora", "library_version": "0", "trap_lambda": 0.01, "trap_scale_min": 0.05,
                  "trap_scale_max": 2.0, "trap_margin": 0.05, "sha256": {"adapter_config.json": "0" * 64}}
    foreign = "---\nlibrary_name: peft\ntags:\n- trl\n---\n\n# Model Card for x\n\nQuick start text.\n"
    once = render_card(foreign, protection, license="mit")
    twice = render_card(once, {**protection, "trap_lambda": 0.02})
    assert twice.count("## Protected update") == 1 and twice.count("Quick start text.") == 1
    assert "| `trap_lambda` | 0.02 |" in twice and "| `trap_lambda` | 0.01 |" not in twice
    data = ModelCard(twice).data
    assert data.tags == ["trl", "trap2", "unmergeable", "lora"] and data.license == "mit"
    assert twice.index("# Model Card for x") < twice.index("## Protected update") < twice.index("Quick start")
    full = ModelCard(render_card(None, {**protection, "update": "full"}, repo_id="me/full"))
    assert full.data.library_name == "transformers" and "full" in full.data.tags
    assert 'AutoModelForCausalLM.from_pretrained("me/full")' in full.text


def _png(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    return path


def _sha256(data):
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_saved_files_get_the_permissions_of_an_ordinary_write(trained, tmp_path):
    """mkstemp and safetensors write owner-only files; a release must be readable as the umask allows."""
    previous = os.umask(0o022)
    try:
        out = str(tmp_path / "shared")
        trained.save_model(out)
        modes = {name: oct(os.stat(path).st_mode & 0o777) for name, path in all_local_files(out).items()}
        assert {"README.md", "adapter_model.safetensors", "training_args.json"} <= set(modes)
        assert set(modes.values()) == {"0o644"}, modes
        os.umask(0o027)
        trained.save_model(out)
        assert trap2_main(["card", out, "--trap_margin", "0.1", "--force"]) == 0
        modes = {name: oct(os.stat(path).st_mode & 0o777) for name, path in all_local_files(out).items()}
        assert set(modes.values()) == {"0o640"}, modes
    finally:
        os.umask(previous)


def test_a_trainer_left_with_nothing_to_train_refuses_and_writes_no_card(tmp_path):
    out = str(tmp_path / "untrained")
    trainer = make_trainer(out)
    trainer.args.max_steps = 0  # changed after the arguments were checked
    with pytest.raises(ValueError, match="max_steps=0 trains nothing"):
        trainer.train()
    assert not os.path.exists(os.path.join(out, "README.md"))


def test_card_cli_parses_settings_as_the_training_flags_do(tmp_path, capsys):
    """`float | None` settings are numbers; a setting not given takes its derived default (trap_offray_lambda
    follows trap_lambda), as it would in training."""
    from trap2_hf.hub.cli import make_parser

    parsed = make_parser().parse_args(["f", "--trap_rescaled_fraction", "0.25", "--trap_offray_lambda", "0.1"])
    assert (parsed.trap_rescaled_fraction, parsed.trap_offray_lambda) == (0.25, 0.1)
    assert not hasattr(parsed, "trap_lambda")  # not given: the card's value or the default is recorded

    folder = str(tmp_path / "elsewhere")
    lora_model(seed=4).save_pretrained(folder)
    argv = ["card", folder, "--trap_lambda", "0.01", "--trap_mode", "fused", "--trap_rescaled_fraction", "0.5"]
    assert trap2_main(argv) == 0
    assert "trap_offray_lambda=0.01" in capsys.readouterr().out
    block = ModelCard.load(os.path.join(folder, "README.md")).data.to_dict()["trap2"]
    assert (block["trap_lambda"], block["trap_offray_lambda"]) == (0.01, 0.01)
    assert (block["trap_mode"], block["trap_rescaled_fraction"]) == ("fused", 0.5)

    assert trap2_main(["card", folder, "--trap_offray_lambda", "0.1", "--force"]) == 0
    _, facts = load_protected_adapter(tiny_llama(), folder)
    assert (facts["trap_lambda"], facts["trap_offray_lambda"], facts["trap_rescaled_fraction"]) == (0.01, 0.1, 0.5)
    assert trap2_main(["card", folder, "--trap_rescaled_fraction", "2", "--force"]) == 2
    assert "trap_rescaled_fraction must be in (0, 1], got 2.0" in capsys.readouterr().err


def test_a_missing_folder_or_an_unreachable_hub_says_so(trained, tmp_path, monkeypatch):
    """huggingface_hub's offline / not-cached error is an EntryNotFoundError too: it is not a missing card."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http as hf_http

    monkeypatch.chdir(tmp_path)
    trained.save_model("out/tiny")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"no local folder 'out/tinyy' \(did you mean 'out/tiny'\?\)") as err:
        load_protected_adapter(tiny_llama(), "out/tinyy")
    assert "HF_HUB_OFFLINE=1 forbids downloading" in str(err.value)
    with pytest.raises(FileNotFoundError, match="'me/adapter' is not in the local cache, and HF_HUB_OFFLINE=1"):
        load_protected_adapter(tiny_llama(), "me/adapter")
    with pytest.raises(FileNotFoundError, match="local_files_only=True forbids"):
        load_protected_adapter(tiny_llama(), "me/adapter", local_files_only=True)
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_protected_adapter(tiny_llama(), "out/tiny/README.md")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)  # huggingface_hub's ~23 s of retries
    with pytest.raises(ConnectionError, match="the Hub could not be reached") as err:
        load_protected_adapter(tiny_llama(), "me/adapter", endpoint="http://127.0.0.1:9")  # nothing listens
    assert "There is no local folder" not in str(err.value)


def test_a_network_failure_while_fetching_files_is_not_called_an_interrupted_upload(hub_server, trained, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(trained.args, "hub_model_id", "dropped")
    monkeypatch.setattr(trained.args, "hub_token", WRITE_TOKEN)
    monkeypatch.setattr(trained, "hub_model_id", None)
    trained.push_to_hub()
    download = huggingface_hub.hf_hub_download

    def drop_after_the_card(repo_id, filename, **kwargs):
        if filename != "README.md":
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from (
                ConnectionResetError("connection reset by peer")
            )
        return download(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", drop_after_the_card)
    with pytest.raises(ConnectionError, match="the Hub could not be reached .ConnectionResetError") as err:
        load_protected_adapter(tiny_llama(), "alice/dropped")
    assert "interrupted" not in str(err.value)


# ----------------------------------------------------------------------------- real-size uploads (LFS)
def wide_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import VOCAB

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))


def large_lora_model():
    """A random-weight LoRA of about 11 MB (float32): over the Hub's 10 MB limit for regular files."""
    config = LoraConfig(r=208, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(wide_llama(), config)


def test_a_large_adapter_goes_through_lfs_and_an_interrupted_push_finishes(hub_server, tmp_path, caplog, capsys):
    import hashlib

    caplog.set_level(logging.DEBUG)
    out = str(tmp_path / "large")
    args = Trap2TrainingArguments(output_dir=out, use_cpu=True, report_to="none", hub_model_id="large",
                                  hub_token=WRITE_TOKEN, trap_lambda=0.005)
    trainer = Trap2Trainer(model=large_lora_model(), args=args, train_dataset=token_dataset(4))
    hub_server.multipart_chunk_size = 5 * 1024 * 1024

    hub_server.fail_uploads = 1  # the storage refuses the first part: nothing reaches the repo
    with pytest.raises(HubPushError, match="storage the Hub sent the large files to answered 403 Forbidden: Request has expired. .*Nothing is lost"):
        trainer.push_to_hub()
    weights = os.path.join(out, "adapter_model.safetensors")
    size = os.path.getsize(weights)
    assert size > 10 * 1024 * 1024
    assert "adapter_model.safetensors" not in hub_server.files("alice/large") and not hub_server.objects
    hub_server.fail_commits = 1  # the bytes are stored, the commit fails
    with pytest.raises(HubPushError, match="Nothing is lost"):
        trainer.push_to_hub()
    with open(weights, "rb") as f:
        local = f.read()
    sha = hashlib.sha256(local).hexdigest()
    assert sha in hub_server.objects and "adapter_model.safetensors" not in hub_server.files("alice/large")
    puts = len([r for r in hub_server.storage_requests if r[0] == "PUT"])
    assert puts == 1 + 3  # the refused part, then three parts of 5 MiB at most
    trainer.push_to_hub()  # re-run: the stored object is not uploaded again, the commit goes through
    assert len([r for r in hub_server.storage_requests if r[0] == "PUT"]) == puts

    repo = hub_server.files("alice/large")
    assert repo["adapter_model.safetensors"] == local
    lfs = {entry["path"]: entry for entry in hub_server.lfs_commits}
    assert lfs["adapter_model.safetensors"]["oid"] == sha and lfs["adapter_model.safetensors"]["size"] == size
    card = ModelCard(repo["README.md"].decode())
    recorded = card.data.to_dict()["trap2"]["sha256"]
    assert recorded and all(recorded[name] == _sha256(repo[name]) for name in recorded)
    assert not [name for name in repo if name.endswith(PICKLE_NAMES)], sorted(repo)
    commits = len(hub_server.repos["alice/large"]["commits"])
    trainer.push_to_hub()  # nothing changed: no new commit
    assert len(hub_server.repos["alice/large"]["commits"]) == commits

    # Pull through the storage redirect: the same weights, checked against the card.
    model, facts = load_protected_adapter(wide_llama(), "alice/large")
    assert_same_weights(adapter_weights(trainer.model), model)
    assert facts["sha256"]["adapter_model.safetensors"] == sha
    assert any(r[0] == "GET" and sha in r[1] for r in hub_server.storage_requests)

    # The token goes to the Hub's API only: never to the storage, into a file, a log line or the console.
    assert all(auth is None for _, _, auth in hub_server.storage_requests)
    assert all(auth in (None, f"Bearer {WRITE_TOKEN}") for _, _, auth in hub_server.requests)
    assert all(WRITE_TOKEN.encode() not in data for data in repo.values())
    captured = capsys.readouterr()
    assert WRITE_TOKEN not in caplog.text + captured.out + captured.err


def test_the_card_says_what_the_audit_measured_or_that_none_ran():
    protection = {"update": "lora", "library_version": "0", "trap_lambda": 0.05, "trap_scale_min": 0.05,
                  "trap_scale_max": 2.0, "trap_margin": 0.05, "sha256": {"adapter_config.json": "0" * 64}}
    unaudited = ModelCard(render_card(None, protection)).text
    assert "no merge audit was run for this update" in unaudited
    assert "degrade" not in unaudited and "base model's level" not in unaudited  # no promise it did not measure

    naive = {"method": "task_arithmetic", "mode": "average", "params": {"weight": 0.5},
             "protected": {"copy": 0.03, "average": 0.3}, "unprotected": {"copy": 0.75, "average": 0.7}}
    audited = ModelCard(render_card(None, protection, audit={**AUDIT, "methods": [naive, *AUDIT["methods"]]})).text
    assert "no merge audit was run" not in audited
    assert ("Under a naive task_arithmetic merge (weights 1/N), the protected task `copy` fell from 0.91 (alone) to "
            "0.03 (accuracy; base model 0.02; the same merge with an unprotected update: 0.75).") in audited
    assert "The strongest of the 2 merges audited, task_arithmetic (best), left `copy` at 0.05." in audited
    assert "Re-scaled by s = 0.5, 1.5, it scored 0.1, 0.05 (unprotected: 0.8, 0.85)." in audited

    # An audit whose merges kept the skill says so, in the same words: it does not claim a fall.
    kept = {**naive, "protected": {"copy": 0.95, "average": 0.8}}
    text = ModelCard(render_card(None, protection, audit={**SHORT_AUDIT, "methods": [kept]})).text
    assert "the protected task `copy` was at 0.95 (accuracy; base model 0.02;" in text and "fell" not in text


# ----------------------------------------------------------------------------- folders that are not an adapter
def test_folders_that_are_not_adapters_get_advice_that_works(tmp_path, capsys):
    """A full model folder and a Trainer output folder holding only checkpoints: the advice names what the folder
    is and what to pass instead, and following it works."""
    full = str(tmp_path / "full-model")
    tiny_llama().save_pretrained(full)
    with pytest.raises(ProtectionCardError, match=r"is a full model folder .*not a PEFT adapter: load it with "
                       r"AutoModelForCausalLM.from_pretrained\('.*full-model'\)"):
        load_protected_adapter(tiny_llama(), full)

    out = str(tmp_path / "run")
    make_trainer(out, save_strategy="steps", save_steps=1).train()  # the run ends without save_model()
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2"]
    last = os.path.join(out, "checkpoint-2")
    with pytest.raises(ProtectionCardError, match=rf"only Trainer checkpoints \(checkpoint-1, checkpoint-2\): pass "
                       rf"the last one, load_protected_adapter\(base_model, '{last}'\)"):
        load_protected_adapter(tiny_llama(), out)
    _, facts = load_protected_adapter(tiny_llama(), last)  # the advice works
    assert facts["trap_lambda"] == 0.005

    assert trap2_main(["card", out, "--trap_lambda", "0.005"]) == 2
    assert f"only Trainer checkpoints (checkpoint-1, checkpoint-2): pass the last one, `trap2 card {last}`" in (
        capsys.readouterr().err
    )
    assert trap2_main(["card", last]) == 0


# ----------------------------------------------------------------------------- trap2 card keeps what ran
def test_card_refuses_to_change_a_recorded_training_setting_unless_forced(trained, tmp_path, capsys):
    out = str(tmp_path / "saved")
    trained.save_model(out)

    def block():
        return ModelCard.load(os.path.join(out, "README.md")).data.to_dict()["trap2"]

    recorded = block()
    assert (recorded["trap_lambda"], recorded["trap_offray_lambda"]) == (0.005, 0.005)
    assert trap2_main(["card", out, "--trap_lambda", "0.02"]) == 2
    err = capsys.readouterr().err
    assert "--trap_lambda 0.02 (the card records 0.005) would change what it says ran" in err and "--force" in err
    assert block() == recorded
    assert trap2_main(["card", out, "--trap_lambda", "0.005", "--license", "mit"]) == 0  # the same value: no change

    # Forced: the settings training derived follow (trap_offray_lambda from trap_lambda, the fraction from the
    # scales per step); one the card holds at another value than derived stays.
    assert trap2_main(["card", out, "--trap_lambda", "0.02", "--trap_scales_per_step", "4", "--force"]) == 0
    changed = block()
    assert (changed["trap_lambda"], changed["trap_offray_lambda"], changed["trap_scales_per_step"]) == (0.02, 0.02, 4)
    assert recorded["trap_mode"] == changed["trap_mode"] == "fused"
    assert (recorded["trap_rescaled_fraction"], changed["trap_rescaled_fraction"]) == (0.125, 0.0625)
    assert trap2_main(["card", out, "--trap_offray_lambda", "0.1", "--force"]) == 0
    assert trap2_main(["card", out, "--trap_lambda", "0.03", "--force"]) == 0
    assert (block()["trap_lambda"], block()["trap_offray_lambda"]) == (0.03, 0.1)


def test_the_card_makes_no_protection_claim_for_an_update_the_audit_cannot_judge():
    """An audit whose update alone does not beat the base (issue 32): no "works as released", no protection
    claim, the reason instead; the merges not measured are the ones that did not run."""
    protection = {"update": "lora", "library_version": "0", "trap_lambda": 0.05, "trap_scale_min": 0.05,
                  "trap_scale_max": 2.0, "trap_margin": 0.05, "sha256": {"adapter_config.json": "0" * 64}}
    naive = {"method": "task_arithmetic", "mode": "average", "params": {"weight": 0.5},
             "protected": {"copy": 0.0, "average": 0.0}, "unprotected": None}
    audit = {**AUDIT, "base": {"copy": 0.0, "reverse": 0.0}, "chance": {"copy": 0.125, "reverse": 0.125},
             "standalone": {"protected": 0.0, "unprotected": None}, "methods": [naive]}
    text = ModelCard(render_card(None, protection, audit=audit)).text
    assert "It works as released" not in text and "behaves like an ordinary fine-tune" not in text
    assert "no verdict: the update alone does not beat the base" in text
    assert "fell from" not in text and "Stops:" not in text

    # A verdict it can give: the merges not measured are named from what ran, not "other merges".
    judged = {**AUDIT, "standalone": {"protected": 0.91, "unprotected": None}, "methods": [naive | {"protected": {"copy": 0.03, "average": 0.3}},
                                   {**naive, "method": "ties", "params": {"weight": 0.5, "density": 0.2}}],
              "config": {"modes": ["average"], "not_audited": {"methods": ["dare_ties", "tsv"], "modes": ["best"]}}}
    text = ModelCard(render_card(None, protection, audit=judged)).text
    assert "It works as released" in text
    assert "Other merges were not measured" not in text
    assert "Not measured: the modes best; the methods dare_ties, tsv." in text
    assert "No unprotected twin was audited" in text
