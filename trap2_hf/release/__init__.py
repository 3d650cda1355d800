"""What a release records, written by the trainers and `trap2 card` and read back when it is loaded, one module per
reason to change:

- protection.py: the `trap2` block of the card (the machine-readable record a loader trusts);
- card.py: the model card around it (metadata, the human section, the audit table from `trap2_hf/report/`);
- upload.py: what may leave the machine and how (save first, no pickles or secrets, clear errors);
- mixin.py: `Trap2HubMixin`, the trainers' saves and pushes.

The files of an update and their checksums are `trap2_hf/files.py`; pulling a release back is `trap2_hf/hub/`,
which exports the public names of both (`from trap2_hf.hub import Trap2HubMixin, write_card, ...`)."""
