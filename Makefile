# The seed's targets, kept as thin wrappers over the craken CLI.
#   craken_ds{1,2,3}        train with the ZeRO-1/2/3 preset (--preset ds_zeroN: templates/ds_zeroN_config.json)
#   craken_ds{1,2,3}_auto   the same, with GPU auto-detection and planning (--auto)
#   test_craken_ds{1,2,3}[_auto]  the short test training (--test) of each
# Pass more flags with ARGS, e.g. `make craken_ds2 ARGS="--model ./my-model --dataset data.jsonl"`.
# With SCRIPT, each target runs your own training script instead of craken's loop (craken launch):
#   make craken_ds2 SCRIPT=train.py SCRIPT_ARGS="--epochs 1"     make test_craken_ds3 SCRIPT="-m mypkg.train"
CRAKEN ?= craken
ARGS ?=
SCRIPT ?=
SCRIPT_ARGS ?=
# craken train, or craken launch [flags] SCRIPT [SCRIPT_ARGS] (run flags must come before the script)
COMMAND = $(if $(SCRIPT),launch,train)
TARGET = $(if $(SCRIPT),$(SCRIPT) $(SCRIPT_ARGS))

STAGES := 1 2 3
.PHONY: $(foreach s,$(STAGES),craken_ds$(s) craken_ds$(s)_auto test_craken_ds$(s) test_craken_ds$(s)_auto) test

$(foreach s,$(STAGES),craken_ds$(s)): craken_ds%:
	$(CRAKEN) $(strip $(COMMAND) --preset ds_zero$* --name ds$* $(ARGS) $(TARGET))

$(foreach s,$(STAGES),craken_ds$(s)_auto): craken_ds%_auto:
	$(CRAKEN) $(strip $(COMMAND) --preset ds_zero$* --auto --name ds$*_auto $(ARGS) $(TARGET))

$(foreach s,$(STAGES),test_craken_ds$(s)): test_craken_ds%:
	$(CRAKEN) $(strip $(COMMAND) --preset ds_zero$* --test --name ds$* $(ARGS) $(TARGET))

$(foreach s,$(STAGES),test_craken_ds$(s)_auto): test_craken_ds%_auto:
	$(CRAKEN) $(strip $(COMMAND) --preset ds_zero$* --auto --test --name ds$*_auto $(ARGS) $(TARGET))

test:
	python3 -m pytest -q
