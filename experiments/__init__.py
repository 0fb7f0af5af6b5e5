"""The study: every variant x seeds on DSB2018, accuracy against cost (`python -m experiments.study`)."""
