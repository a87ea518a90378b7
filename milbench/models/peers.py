"""Peer implementations from other libraries, behind milbench's contract, so a benchmark can set
them beside milbench's own models on the same folds.

``torchmil_abmil``: torchmil's ABMIL (Ilse et al. 2018) at torchmil's defaults, trained by
torchmil's own ``Trainer`` (bags one at a time, Adam at ``learning_rate``, ``epochs`` epochs,
the best epoch kept by the trainer's objective, its training accuracy, since no validation set
is given). The only milbench step is a scaler fitted on the training instances (the same one
D-MIL applies), so that raw feature scales do not decide the comparison. It reads no clinical
table: it is the peer of the benchmark's bag models, not of the lymphocytosis pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit
from sklearn.utils import check_random_state

from milbench.models.base import BagClassifier, store_params
from milbench.models.registry import Tag
from milbench.training import seeded, torch_threads
from preprocessing.transforms import BagTransform


class TorchmilABMIL(BagClassifier):
    """torchmil's ABMIL trained by torchmil's Trainer (see the module docstring)."""

    mil_tags = frozenset({Tag.INSTANCES, Tag.INSTANCE_SCORES})


    def __init__(self, epochs: int = 40, learning_rate: float = 5e-4, gated: bool = False,
                 torch_threads: int | None = 1, random_state: int | None = None):
        store_params(self, locals())

    def _validate_params(self) -> None:
        if int(self.epochs) < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    def _fit(self, bags, labels, clinical) -> None:
        from tensordict import TensorDict
        from torchmil.data import collate_fn
        from torchmil.models import ABMIL
        from torchmil.utils import Trainer

        self.transform_ = BagTransform(n_components=None, random_state=0).fit(bags)
        scaled = self.transform_.transform(bags)
        examples = [TensorDict({"X": torch.as_tensor(bag, dtype=torch.float32),
                                "Y": torch.tensor(float(label))})
                    for bag, label in zip(scaled, labels, strict=True)]
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        with seeded(seed, self.torch_threads):
            model = ABMIL(in_shape=(bags[0].shape[1],), gated=bool(self.gated))
            loader = torch.utils.data.DataLoader(examples, batch_size=1, shuffle=True,
                                                 collate_fn=collate_fn)
            trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=self.learning_rate),
                              device="cpu", disable_pbar=True, verbose=False)
            trainer.train(max_epochs=int(self.epochs), train_dataloader=loader)
            self.network_ = trainer.get_best_model().eval()

    def _forward(self, bags) -> tuple[np.ndarray, list[np.ndarray]]:
        bags = self._check_predict_bags(bags)
        logits, weights = [], []
        with torch.no_grad(), torch_threads(self.torch_threads):
            for bag in self.transform_.transform(bags):
                x = torch.as_tensor(bag, dtype=torch.float32).unsqueeze(0)
                logit, attention = self.network_(x, torch.ones(1, len(bag)), return_att=True)
                logits.append(float(logit.reshape(())))
                weights.append(torch.softmax(attention.reshape(-1).double(), 0).numpy())
        return np.array(logits), weights

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        positive = expit(self._forward(bags)[0])
        return np.column_stack([1.0 - positive, positive])

    def instance_scores(self, bags, clinical=None) -> list[np.ndarray]:
        """torchmil's attention, normalised over each bag."""
        return self._forward(bags)[1]
