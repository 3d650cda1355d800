"""The embedded demo (`make demo`, `trap2 demo`): a pretrained MiniLM, LoRA updates for synthetic
4-way text classification tasks, one of them protected, then the merge audit.

`tasks` generates the task sets, `model` builds the encoder, adapters and heads, `run` trains the
updates and runs the audit.
"""
