"""The central controller: ownership state machine, rollouts, RL batches, the recipe driver."""
