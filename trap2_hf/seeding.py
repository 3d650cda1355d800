"""Every random draw's seed, as a function of the run's seed and where the draw is (step, micro-batch, layer).

A draw that depends only on these numbers needs no state: every rank draws the same, a resumed run draws what
the interrupted one would have, and a forward recomputed by activation checkpointing sees the same masks.
Each kind of draw is a `Stream`, whose weights and salt keep it apart from the others; the values are fixed
(changing one changes every run's draws), so a new draw gets a new stream rather than reusing one.

Pure Python, importing nothing of the package: any layer may use it.
"""

from dataclasses import dataclass

SEED_MODULUS = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit value


@dataclass(frozen=True)
class Stream:
    """seed(*values) = (sum_i values[i] * weights[i] + salt) mod modulus."""

    name: str
    weights: tuple[int, ...]
    salt: int = 0
    modulus: int = SEED_MODULUS

    def seed(self, *values: int) -> int:
        if len(values) != len(self.weights):
            raise ValueError(f"Stream {self.name!r} mixes {len(self.weights)} values, got {len(values)}: {values}.")
        return (sum(int(v) * w for v, w in zip(values, self.weights)) + self.salt) % self.modulus

    def generator(self, *values: int, device=None):
        """A `torch.Generator` (on `device`, default CPU) seeded with `seed(*values)`."""
        import torch

        generator = torch.Generator() if device is None else torch.Generator(device=device)
        return generator.manual_seed(self.seed(*values))


# (run seed, optimizer step): the scales of a step.
SCALES = Stream("scales", (1_000_003, 7_919), 12_345)
# (run seed, optimizer step): the candidate scales of the best-response draw (`best_response.py`) and the rows they
# are evaluated on; its own stream, so the step's random scales are not shifted by it.
CANDIDATES = Stream("candidates", (1_000_003, 7_919), 12_345 + 7_777 * 1_000_003)
# (run seed, optimizer step): the rows the candidate off-ray draws (`best_response_offray`) are evaluated on.
OFFRAY_CANDIDATES = Stream("offray_candidates", (1_000_033, 104_729), 99_991 + 5_555 * 1_000_033)
# (run seed, optimizer step, micro-batch): the rows each scale re-scales in sub_batch and fused modes.
ROWS = Stream("rows", (1_000_003, 7_919, 104_729), 99_991)
# (run seed, optimizer step): the off-ray terms' weights, keep rates, coefficients and per-pass seeds.
OFFRAY = Stream("offray", (1_000_033, 104_729), 99_991)
# (run seed, optimizer step): the guard pass's seed.
GUARD = Stream("guard", (7_777_777, 31_337), 17, 2**62)
# (pass seed,): the rows an off-ray pass takes when trap_offray_fraction < 1.
OFFRAY_ROWS = Stream("offray_rows", (1,), 271_828)
# (pass seed, layer index): an off-ray pass's masks and noise in one layer.
OFFRAY_LAYER = Stream("offray_layer", (1, 1_000_000_007))
# (run seed, partner index): a pseudo-partner's initialisation, random labels and batches (`offray/pseudo.py`).
PSEUDO = Stream("pseudo", (1_000_037, 15_485_863), 424_242)
# (audit seed, draw index): the audit's transforms of an update alone (`audit/transforms.py`): its random drops and
# per-tensor scales, the same for the protected update and its twin.
AUDIT_TRANSFORMS = Stream("audit_transforms", (1_000_039, 32_452_843), 271_828)
