//! Expert-activation predictor. The model and its training arrive with the predictor issue.
