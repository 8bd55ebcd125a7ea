"""Building the elastic parent from a dense Nemotron-H model (importance, permutation, router,
curriculum, distillation). Depends on ``elastic.slicer``; nothing here yet."""
