"""accel's contracts: errors, artifacts and their store, stages, recipes, targets. No torch here."""
