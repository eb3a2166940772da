"""Settings of distributed training (Ray Train) and the loss schedule."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """How :mod:`creditgraph.train.trainer` trains the model on the ClusterGCN shards.

    Loss schedule (``L = L_den + beta * L_out + lambda * L_dsl`` + adversary), per epoch ``e``:

    * ``beta_e = beta_max * min(1, (e + 1) / warmup_epochs)``: the outcome loss ramps up while the
      density tower, which the IPW weights come from, settles;
    * IPW weights are applied from epoch ``ipw_start_epoch`` on (before that, weights are 1);
    * ``lambda_e = 0`` during warm-up, then ``lambda_max * min(1, (e + 1 - warmup) / warmup)``:
      the DSL penalty only acts on a model that already fits.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(5.0, gt=0)
    ema_decay: float = Field(
        0.95, ge=0, lt=1, description="EMA of the weights per step (0: off); evaluation uses it"
    )
    shards_per_step: int = Field(1, ge=1, description="ClusterGCN: parts glued into one step")
    warmup_epochs: int = Field(3, ge=1)
    ipw_start_epoch: int = Field(1, ge=0)
    beta_max: float = Field(1.0, gt=0)
    lambda_max: float = Field(0.5, ge=0)
    patience: int = Field(4, ge=1, description="early stopping on the validation loss")
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool | None = Field(None, description="None: use CUDA when the cluster has GPUs")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    seed: int = 0
    storage_path: str | None = Field(
        None, description="checkpoint storage (shared FS or cloud URI); default RUN/checkpoints"
    )

    def weights(self, epoch: int) -> tuple[float, float, bool]:
        """(beta, lambda, ipw_on) for an epoch, per the schedule above."""
        w = self.warmup_epochs
        beta = self.beta_max * min(1.0, (epoch + 1) / w)
        lam = 0.0 if epoch < w else self.lambda_max * min(1.0, (epoch + 1 - w) / w)
        return beta, lam, epoch >= self.ipw_start_epoch
