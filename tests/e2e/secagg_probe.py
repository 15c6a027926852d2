"""A transform defined outside pilot_hpc (loaded as `secagg_probe:RowProbe`) that saves each
client's update as it leaves the client, with its round-start rows, to the folder named by
$SECAGG_PROBE: what the test needs to recompute the sum that secure aggregation hides from
the server. It encodes nothing and leaves decode alone (secure aggregation refuses
transforms that decode)."""

import os

import torch

from pilot_hpc.fl.transforms import Transform


class RowProbe(Transform):
    needs_start = True

    def encode_update(self, update):
        torch.save({"num_samples": update.num_samples, "status": update.status.value,
                    "rows": {p.value: t.detach().cpu().clone() for p, t in update.parts.items()},
                    "start": {p.value: t.detach().cpu().clone() for p, t in update.start.items()}},
                   os.path.join(os.environ["SECAGG_PROBE"], f"r{update.round}_c{update.client}.pt"))
