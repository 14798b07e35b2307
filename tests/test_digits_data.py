"""The built-in digits data: scikit-learn's images and stratified split, read without importing
scikit-learn once the split is cached (importing it costs seconds on every command)."""

import sys

import numpy as np
import torch


def test_digits_split_is_sklearn_s_and_later_calls_need_no_sklearn(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    from dfkd.data import load_digits

    monkeypatch.setenv("DFKD_CACHE", str(tmp_path))
    d = sk_digits()
    spec = load_digits(seed=3, test_fraction=0.25)
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.25, random_state=3, stratify=d.target)
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    for ds, idx in ((spec.train, np.sort(tr)), (spec.test, np.sort(te))):
        assert torch.equal(ds.images, x[idx]) and torch.equal(ds.labels, y[idx])
    assert len(list((tmp_path / "digits").glob("split_*seed3_test0.25.npz"))) == 1
    # with the split cached, scikit-learn is not imported (its modules are dropped, then looked for again)
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    again = load_digits(seed=3, test_fraction=0.25)
    assert not [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]
    assert torch.equal(again.train.images, spec.train.images) and torch.equal(again.test.labels, spec.test.labels)
