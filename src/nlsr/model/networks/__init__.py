"""The networks `--model` names: one module each, with make_model(args) and FLAGS."""
