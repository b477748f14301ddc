"""``graphopt tune CHECKPOINT --data ml-100k`` judges a checkpoint only on the data it was fine-tuned on."""

from __future__ import annotations

from graphopt.cli import main
from graphopt.rec.data import synthetic_movielens
from graphopt.rec.finetune import FinetuneConfig, finetune, save_checkpoint


def test_a_checkpoint_fine_tuned_on_other_data_is_refused(tmp_path, capsys):
    """Was: tuned and starred on ML-100K's test users a model trained on other data (bench refused it,
    tune did not): the fingerprint the checkpoint records is compared before anything runs."""
    data = synthetic_movielens(users=12, items=1682, interactions=300, seed=5)  # ML-100K's item count
    result = finetune("bert4rec:tiny", data, FinetuneConfig(epochs=1, max_steps=2, max_minutes=None, precision="fp32"))
    ckpt = save_checkpoint(result, tmp_path / "ckpt")
    out = tmp_path / "tuned"
    code = main(["tune", str(ckpt), "--data", "ml-100k", "--runtimes", "eager", "--batch-sizes", "4",
                 "--threads", "1", "--max-trials", "1", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "was fine-tuned on" in err and "fine-tune on this data" in err and not out.exists()
