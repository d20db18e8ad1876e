"""Training and evaluation: the LightningModule, the CLI, callbacks, schedules, metrics and reports."""
