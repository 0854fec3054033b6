"""Continual learners and stream-based active learning (issue 13): metrics over the accuracy
matrix (`metrics`), the Discrete Key-Value Bottleneck (`kv_bottleneck`), query strategies under a
labelling budget (`active`). See docs/continual.md."""
