"""The embedded demo (`make demo`, `trap2 demo`): a pretrained MiniLM, LoRA updates for synthetic
4-way text classification tasks, one of them protected, then the merge audit.

`tasks` generates the task sets, `model` builds the encoder, adapters and heads, `arguments` holds the
demo's settings, `pipeline` trains the updates, audits them and checks the criteria, `variants` compares
protection settings on the same plain updates, and `run` is the `trap2 demo` command.
"""
