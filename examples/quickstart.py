"""qaconv-gs quickstart: train QAConv-GS on a synthetic re-ID data set, evaluate, save, reload, resume.

Run it top to bottom (about 10 s on 2 cores):

    python examples/quickstart.py [OUTPUT_DIR]

Everything is NumPy in, NumPy out. The "features" stand for what a CNN backbone outputs: one [C, H, W] feature
map per image. With real data, replace step 1 by your own arrays (or train a backbone through
`qaconv_gs.torch.QAConvGSLoss`).
"""

import os
import sys
import tempfile

import numpy as np
import qaconv_gs as qg
from qaconv_gs.data import make_synthetic, split_per_class

out_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="qaconv_gs_quickstart_")
os.makedirs(out_dir, exist_ok=True)

# 1. Data: 60 identities; identities come in families that share local parts, so each one has look-alikes.
features, labels = make_synthetic(num_classes=60, samples_per_class=16, seed=0)  # [960, 32, 8, 4], [960]
train_x, train_y, test_x, test_y = split_per_class(features, labels, held_out=2, seed=0)
N, (C, H, W) = 60, features.shape[1:]
print(f"train {train_x.shape}, held-out {test_x.shape}; chance rank-1 = {1 / N:.3f}")

# 2. The model: one learnable embedding map per class. In training, every sample is scored against its own
#    class and the k classes nearest to it (not against all N): that is what makes training cheap.
model = qg.QAConvGS(num_classes=N, channels=C, height=H, width=W, k_nearest=12, seed=0)
print(model)

# 3. Graph sampling: each batch is a centre class plus its nearest classes, num_instances images each.
#    Passing a callable makes the batches follow the model's neighbour table, which is rebuilt every epoch.
sampler = qg.GraphSampler(
    train_y, batch_size=32, num_instances=4, neighbors=lambda: model.class_neighbors, seed=0
)


# 4. Train: SGD with Nesterov momentum and weight decay (PyTorch semantics), cosine learning-rate schedule.
#    fit() calls model.on_epoch_start() at every epoch start (fresh neighbours) and records a history.
def _change(x: float) -> str:
    """The epoch's neighbour-table change; '-' at the first epoch (no earlier table to compare with)."""
    return "-" if np.isnan(x) else f"{x:.3f}"


class HeldOutRank1:
    """A callback: held-out identification accuracy after every epoch, stored in the epoch's stats."""

    def on_epoch_end(self, trainer, epoch, stats):
        ids, _ = trainer.model.identify(test_x, top=1)
        stats["rank1"] = float(np.mean(ids[:, 0] == test_y))
        print(
            f"epoch {epoch + 1}: loss {stats['loss']:.3f}  train acc {stats['acc_cls']:.3f}  "
            f"held-out rank-1 {stats['rank1']:.3f}  neighbour change {_change(stats['neighbor_change'])}"
        )


trainer = qg.Trainer(model, lr=0.05, schedule="cosine:4:0.05", seed=0)
history = trainer.fit((train_x, train_y, sampler), epochs=4, callbacks=[HeldOutRank1()])

# 5. Evaluate: identification against all class embeddings, and pairwise QAConv matching (eval mode).
ids, scores = model.identify(test_x, top=5)  # [120, 5] class ids and scores, best first
rank1 = np.mean(ids[:, 0] == test_y)
rank5 = np.mean((ids == test_y[:, None]).any(axis=1))
print(f"held-out rank-1 {rank1:.3f}, rank-5 {rank5:.3f}")
S = model.match(test_x[:4], test_x[:10])  # [4, 10] similarity matrix
print("match scores of held-out sample 0 vs 10 others:", np.round(S[0], 2))
print("nearest classes of class 0:", model.class_neighbors[0][:5])

# 6. Curves, checkpoint (model + optimizer + history, written atomically), reload, resume.
curves = history.plot(os.path.join(out_dir, "quickstart_curves.png"))
ckpt = trainer.save_checkpoint(os.path.join(out_dir, "quickstart.npz"))
restored = qg.QAConvGS.load(ckpt)  # a trainer checkpoint is also a plain model checkpoint
assert np.array_equal(restored.identify(test_x, top=5)[0], ids)
resumed = qg.Trainer.from_checkpoint(ckpt)  # model and optimizer state, epoch 4 of the schedule
resumed.fit((train_x, train_y, sampler), epochs=1, progress=False)
print(f"resumed for one more epoch: loss {resumed.history.epochs[-1]['loss']:.4f}")
print(f"wrote {curves} and {ckpt}")
