"""The demo's digits classifier learns the digits (it scores the demo's samples)."""
import torch

from dataset.digits import as_tensor_batch
from evaluations.digits_classifier import accuracy, features, load_or_train, train_classifier


def test_classifier_learns_and_round_trips(tmp_path):
    model, acc = train_classifier(epochs=4, log=lambda *_: None)
    assert acc > 0.9, acc
    xv, yv = as_tensor_batch("heldout", 32)
    path = tmp_path / "clf.pt"
    from utils.checkpoint import save_checkpoint
    save_checkpoint({"model": model.state_dict()}, path)
    again = load_or_train(path)
    assert accuracy(again, xv, yv) == acc
    assert features(again, xv[:5]).shape == (5, 128)
    # Upsampled inputs are resized to the classifier's 32 px.
    big = torch.nn.functional.interpolate(xv[:8], size=64, mode="nearest")
    assert features(again, big).shape == (8, 128)
