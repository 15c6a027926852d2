"""A transform defined outside pilot_hpc (loaded as `transform_probe:CountingTransform`):
an identity that appends every call to the file named by $TRANSFORM_PROBE."""

import json
import os

from pilot_hpc.fl.transforms import Transform


class CountingTransform(Transform):
    def _note(self, **row) -> None:
        with open(os.environ["TRANSFORM_PROBE"], "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def encode(self, part, row, update):
        self._note(call="encode", round=update.round, client=update.client, part=part.value, size=row.numel())
        return row

    def decode(self, part, block, cols):
        self._note(call="decode", part=part.value, rows=block.shape[0], cols=list(cols))
        return block


class DeltaProbe(Transform):
    """Needs the round-start rows: notes, per update, a fingerprint of each part's start
    and the norm of its change; sends the parameters unchanged."""

    needs_start = True

    def encode_update(self, update):
        with open(os.environ["TRANSFORM_PROBE"], "a") as fh:
            for part, row in update.parts.items():
                start = update.start[part]
                fh.write(json.dumps({"round": update.round, "client": update.client, "part": part.value,
                                     "start": [float(start.sum()), float(start.square().sum())],
                                     "change": float(update.delta(part).norm())}) + "\n")


class ChangeProbe(Transform):
    """Needs the round-start rows: notes, per update, the L2 norm of its change over both
    parts together (float64, as sent minus as started) and the norm of what it sends."""

    needs_start = True

    def encode_update(self, update):
        change = sum(float((update.parts[p].double() - update.start[p].double()).square().sum()) for p in update.parts)
        sent = sum(float(update.parts[p].double().square().sum()) for p in update.parts)
        with open(os.environ["TRANSFORM_PROBE"], "a") as fh:
            fh.write(json.dumps({"round": update.round, "client": update.client, "status": update.status.value,
                                 "change": change ** 0.5, "sent": sent ** 0.5}) + "\n")
