# One entry point per job; every target sets up .venv itself when missing, and a table target
# run again replaces its previous run folders (--overwrite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs
# Encoders to compare, as NAME=PATH (any checkpoint format); empty: the embedded defaults.
WEIGHTS ?=
# Folder holding the benchmarks' data (see README); empty: the embedded data sets.
DATA_ROOT ?=
# Prebuilt wheels beside the checkout (CI): detectron2 is not on PyPI, so its tests run only
# where a wheel is here; elsewhere they skip, naming the reason.
WHEELS ?= ../shared/wheels
D2_STAMP := $(VENV)/.detectron2
d2_deps = $(if $(wildcard $(WHEELS)/detectron2-*.whl),$(D2_STAMP))
weights_flags = $(foreach w,$(WEIGHTS),--weights $(w))

.PHONY: setup demo test bench gpu-check lint table1 table2 table3 invariance paper-small lambda-sweep

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

$(D2_STAMP): $(STAMP)
	$(BIN)/pip install -q --find-links $(WHEELS) detectron2
	touch $(D2_STAMP)

setup: $(STAMP) $(d2_deps)

demo: $(STAMP)
	rm -rf $(OUT)/demo
	$(BIN)/pirl-tools pretrain --out $(OUT)/demo

test: $(STAMP) $(d2_deps)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench.run --out BENCHMARKS.md

# On a GPU machine: tests/test_cuda.py, then the GPU benchmarks into BENCHMARKS.md.
gpu-check: $(STAMP)
	PYTHON=$(BIN)/python bench/gpu_check.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The embedded PIRL checkpoint that the tables use when WEIGHTS is empty (lowshot adds its
# own random-init row on the embedded set).
DEMO_CKPT := $(OUT)/demo/checkpoint.pth
$(DEMO_CKPT): | $(STAMP)
	$(BIN)/pirl-tools pretrain --out $(OUT)/demo
EMBEDDED_WEIGHTS := pirl=$(DEMO_CKPT) random=random:resnet18@0.25
table_weights = $(or $(WEIGHTS),$(EMBEDDED_WEIGHTS))
table_deps = $(STAMP) $(if $(WEIGHTS),,$(DEMO_CKPT))

table1: $(table_deps)
	for w in $(table_weights); do \
	  $(BIN)/pirl-tools transfer detection --weights $$w --out $(OUT)/detection/$${w%%=*} --overwrite \
	    $(if $(DATA_ROOT),--data $(DATA_ROOT)/VOCdevkit) || exit 1; \
	done
	$(BIN)/pirl-tools transfer table1 $(OUT)/detection/* --out $(OUT)/tables

table2: $(STAMP)
	$(BIN)/pirl-tools transfer table2 $(weights_flags) $(if $(DATA_ROOT),--data $(DATA_ROOT)) --out $(OUT)/table2 --overwrite

table3: $(table_deps)
	$(BIN)/pirl-tools transfer lowshot $(foreach w,$(or $(WEIGHTS),pirl=$(DEMO_CKPT)),--weights $(w)) \
	  $(if $(DATA_ROOT),--data $(DATA_ROOT)/imagenet) --out $(OUT)/lowshot --overwrite

invariance: $(STAMP)
	$(BIN)/pirl-tools analyze invariance $(weights_flags) $(if $(DATA_ROOT),--data $(DATA_ROOT)/imagenet/val) --out $(OUT)/invariance --overwrite

# The paper's findings, small: PIRL, NPID++ and Jigsaw pretrained on the embedded set with the
# same recipe and budget, then Table 2, linear probes per layer, invariance, and report.md.
PAPER_SMALL := $(OUT)/paper-small
SMALL_MODELS := pirl npid jigsaw
small_weights = $(foreach m,$(SMALL_MODELS),--weights $(m)=$(PAPER_SMALL)/$(m)/checkpoint.pth)

paper-small: $(STAMP)
	rm -rf $(PAPER_SMALL)
	for m in $(SMALL_MODELS); do \
	  $(BIN)/pirl-tools pretrain --method $$m --out $(PAPER_SMALL)/$$m \
	    $$( [ $$m = jigsaw ] && echo --num-permutations 100 ) || exit 1; \
	done
	$(BIN)/pirl-tools transfer table2 $(small_weights) --weights random=random:resnet18@0.25 \
	  --out $(PAPER_SMALL)/table2
	for layer in conv1 res2 res3 res4 res5; do \
	  $(BIN)/pirl-tools transfer table2 $(small_weights) --weights random=random:resnet18@0.25 \
	    --layer $$layer --out $(PAPER_SMALL)/layers/$$layer || exit 1; \
	done
	$(BIN)/pirl-tools analyze invariance $(small_weights) --out $(PAPER_SMALL)/invariance
	$(BIN)/pirl-tools analyze report $(PAPER_SMALL)

# The paper's lambda ablation on the embedded recipe: PIRL at lambda 0 (NPID++'s loss) to 1 (the
# patch term alone), each run's kNN, res5 linear probe, loss terms and invariance in one table.
LAMBDA := $(OUT)/lambda
LAMBDAS := 0 0.25 0.5 0.75 1

lambda-sweep: $(STAMP)
	rm -rf $(LAMBDA)
	for lam in $(LAMBDAS); do \
	  $(BIN)/pirl-tools pretrain --lam $$lam --out $(LAMBDA)/lam$$lam || exit 1; \
	done
	$(BIN)/pirl-tools analyze lambda $(LAMBDA)
