# fairsynth: `make help` lists the targets. Quick scale (default) runs on the embedded data on a CPU;
# SCALE=full DATA_ROOT=... runs the paper-scale version on a GPU. SMOKE=1 runs a tiny chain into smoke/.
SHELL := /bin/bash
PYTHON ?= .venv/bin/python
SCALE ?= quick
# A GPU box with its own python runs `make <target> PYTHON=python3`: no venv needed there.
SETUP := $(if $(filter .venv/bin/python,$(PYTHON)),.venv/.stamp,)
DATA_ROOT ?=
# extra flags for a study's command, e.g. `make chestxray ARGS="--epochs 30"` (`make chestxray DRY=1` prints the
# stage commands they make)
ARGS ?=
# quick results live in results/ (committed), full-scale ones in results-full/, smoke runs in smoke/:
# a smoke or quick run can never overwrite full results.
SCALE_OUT := $(if $(or $(SMOKE),$(filter smoke,$(SCALE))),smoke,$(if $(filter full,$(SCALE)),results-full,results))
# Your own data (docs/your-data.md): `make compare DATA=path/table.csv GROUP=sex MINORITY=F` runs chestxray's task
# and the comparison on your label table, minority group vs the rest (`make fairgen DATA=... GROUP=...`: FairGen's
# methods with class = group x the first label; MINORITY is not used there) (GROUP=sex,age BANDS=age=60 MINORITY='F & 60+'
# for an intersection; LABELS=a,b to name the 0/1 label columns, the first compared on). Results go to
# yourdata/<table name>/<group>-<minority>[-<labels>]/<scale>/ (other characters as _), never into results/.
DATA ?=
GROUP ?= sex
MINORITY ?= F
LABELS ?=
BANDS ?=
ASKED = $(shell printf '%s' '$(GROUP)-$(MINORITY)$(if $(LABELS),-$(LABELS))' | tr -c 'A-Za-z0-9,._=+-' '_')
OUT := $(if $(DATA),yourdata/$(basename $(notdir $(DATA)))/$(ASKED)/$(SCALE_OUT),$(SCALE_OUT))
TABLE_BASE := $(if $(DATA),--table '$(DATA)' --group $(GROUP) $(if $(LABELS),--labels $(LABELS)) $(foreach b,$(BANDS),--bands $(b)))
TABLE_FLAGS := $(TABLE_BASE) $(if $(DATA),--minority '$(MINORITY)')
FLAGS := $(if $(SMOKE),--smoke,--scale $(SCALE)) --force
export PYTHONUNBUFFERED := 1

.PHONY: help setup test all chestxray compare planted skintone medmnist fairgen ddpm bench clean-runs

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: .venv/.stamp ## create .venv and install everything (torch from the local disk where it lies there)

.venv/.stamp: requirements.txt requirements-dev.txt
	python3 -m venv .venv
	.venv/bin/pip install --upgrade -q pip
	.venv/bin/pip install -r requirements.txt -r requirements-dev.txt
	touch $@

# The suite runs in TEST_JOBS processes (pytest-xdist, one test file per process at a time, each torch on one
# thread: most tests are single-threaded Python, so 2 processes on 2 cores took 18 min where one took 32); without
# pytest-xdist (a python of your own: PYTHON=python3) it runs in one process.
TEST_JOBS ?= auto
test: $(SETUP) ## run the test suite (CPU, ~minutes); fails if no test is collected
	if $(PYTHON) -c "import xdist" 2>/dev/null; then par="-n $(TEST_JOBS) --dist loadfile"; export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; fi; \
	$(PYTHON) -m pytest -q --durations=30 $$par tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; exit 1; fi; exit $$rc

all: chestxray skintone medmnist fairgen ## the four studies, quick scale (hours on 2 CPU cores; measured times in README)

# A study runs in three steps: write its stages as a makefile (each stage a script with flags, writing files),
# run them with make, JOBS independent stages at a time (a stage whose output records the same command is skipped),
# then the study again, which finds every stage done and writes the report from files. The first two steps run
# twice: stages chosen from the first round's results (compare's ratio sweep, picked on validation scores) join the
# makefile only then, and would otherwise run one at a time inside the study (a second round with nothing new to do
# costs one planning pass).
# DRY=1 prints every stage command instead (those a run would reuse marked '# reuse: ').
# JOBS and THREADS: at quick and smoke scale each stage runs torch on THREADS = 1 thread, JOBS = as many stages at
# once as the machine has cores (at most 8): two 1-thread stages trained 1.1-1.5x the images of one 2-thread stage on
# 2 cores (the skin-tone VAE 0.95x; results/bench/stage_jobs.md). A stage's numbers depend on its thread count, not on
# JOBS; a stage made on another thread count is redone, not reused (common/stages.py). Full scale (a GPU): one stage
# at a time, torch's default threads. JOBS=1 THREADS=2 in a fresh SCALE_OUT runs the stages as before 2026-12-05.
# Under `make -jN` with GNU make before 4.4, each study still runs its stages JOBS at a time: they do not share make's
# N job slots (make passes them only to recipe lines it sees calling $(MAKE), and ours are macros; common.stage_server
# drops them from MAKEFLAGS, so that the stage make runs its own -j$(JOBS) without a warning), so `make -j2 all` runs
# two studies at once, each JOBS stages at a time. Where the slots can be reached (make 4.4's named fifo), the stage
# make shares them instead (not tried on 4.4).
# The stage makefile runs under common.stage_server: each stage starts as a fork of one process that has imported
# torch once, not as a fresh interpreter (2.6-4.6 s a stage on a 2-core AVX2 EPYC, start and first-use imports);
# FAIRSYNTH_FORK_STAGES=0 starts fresh ones.
# (nproc counts the cores this process may use, but reads OMP_NUM_THREADS too: not here)
CORES := $(shell n=$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || \
	getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1); [ "$$n" -ge 1 ] 2>/dev/null || n=1; echo $$(( n < 8 ? n : 8 )))
JOBS ?= $(if $(filter full,$(SCALE)),1,$(CORES))
THREADS ?= $(if $(filter full,$(SCALE)),,1)
STAGE_ENV = $(if $(THREADS),OMP_NUM_THREADS=$(THREADS) )
STAGE_J = -j$(JOBS)
study_cmd = $(STAGE_ENV)$(PYTHON) -m $(1) $(FLAGS) --out $(OUT)/$(2) $(3) $(ARGS)
stage_make = if [ -f runs/$(OUT)/$(1).mk ]; then $(STAGE_ENV)$(PYTHON) -m common.stage_server $(MAKE) $(STAGE_J) -f runs/$(OUT)/$(1).mk PYTHON=$(PYTHON); fi
define staged
	$(call study_cmd,$(1),$(2),$(3)) $(if $(DRY),--dry-run,--makefile runs/$(OUT)/$(2).mk)
	$(if $(DRY),@true,$(call stage_make,$(2)))
	$(if $(DRY),@true,$(call study_cmd,$(1),$(2),$(3)) --makefile runs/$(OUT)/$(2).mk)
	$(if $(DRY),@true,$(call stage_make,$(2)))
	$(if $(DRY),@true,$(call study_cmd,$(1),$(2),$(3)))
endef

chestxray: $(SETUP) ## Korb & Hall: CVAE-rebalanced chest X-ray classifier by sex -> results/chestxray
	$(call staged,classify.chestxray_study,chestxray,$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(TABLE_FLAGS))

# compare builds on a finished chestxray run of the same scale (its plan.json, split files and cells): made first
# (or finished: stages done are reused) unless its report is newer than its stage makefile, i.e. unless the last
# chestxray run got to its report (a fresh clone has chestxray's results but no runs/). DATA_ROOT goes to chestxray.
# PLANTED=1: on the positive control's planted chestxray run instead (results/compare_planted).
CX := chestxray$(if $(PLANTED),_planted)
compare: $(SETUP) ## every generator family (AE, CVAE, DCGAN, DDPM) and non-generative fixes on chestxray's task -> results/compare
	$(if $(DRY),,@[ -f runs/$(OUT)/$(CX).mk ] && [ $(OUT)/$(CX)/plan.json -nt runs/$(OUT)/$(CX).mk ] || $(MAKE) $(if $(PLANTED),planted,chestxray))
	$(call staged,classify.compare_study,compare$(if $(PLANTED),_planted),--chestxray $(OUT)/$(CX))

# The positive control (fairness/plant.py): chestxray on a copy of the data whose women's images carry a planted
# signature (PLANT=KIND:STRENGTH; the default is the smallest strength the repeated check, bench/planted_power.py,
# detected with power >= 0.8: results/bench/planted_power.md, a rule fixed before that run),
# and the planted null (the same kind at strength 0: the real data through the same pipeline). The design must say
# "yes" on the first. `make compare PLANTED=1` then compares the generator families on the planted task.
PLANT ?= lesion:0.4
planted: $(SETUP) ## the positive control: chestxray on planted data and on the planted null -> results/chestxray_planted{,_null}
	$(call staged,classify.chestxray_study,chestxray_planted,--plant $(PLANT) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)))
	$(call staged,classify.chestxray_study,chestxray_planted_null,--plant $(firstword $(subst :, ,$(PLANT))):0 $(if $(DATA_ROOT),--data-root $(DATA_ROOT)))

skintone: $(SETUP) ## Lopez-Perez et al.: VAE reconstruction by skin type, sets A/B/C -> results/skintone
	$(call staged,vae.skintone_study,skintone,$(if $(DATA_ROOT),--data-root $(DATA_ROOT)))

medmnist: $(SETUP) ## Chaptoukaev: AE / cVAE / cGAN augmentation, ResNet-18 -> results/medmnist
	$(call staged,classify.medmnist_study,medmnist,$(if $(DATA_ROOT),--data-root $(DATA_ROOT)))

fairgen: $(SETUP) ## FairGen with our DDPM: resampling, CB loss, DPO; downstream fairness -> results/fairgen
	$(call staged,diffusion.fairgen_study,fairgen,$(if $(DATA_ROOT),--skin-root $(DATA_ROOT)) $(TABLE_BASE))

ddpm: $(SETUP) ## our NIH DDPM (32 px, ~25 min CPU) + DDIM-50 vs DDPM-1000 domain FD, 40 samples each -> results/ddpm
	$(call staged,diffusion.ddpm_study,ddpm,$(if $(DATA_ROOT),--data-root $(DATA_ROOT)))

bench: $(SETUP) ## the studies' stage minutes by kind; CPU benchmarks: FID vs pytorch-fid, our U-Net vs diffusers (installs bench/requirements.txt)
	$(PYTHON) bench/stage_times.py --results $(OUT)
	.venv/bin/pip install -q -r bench/requirements.txt
	$(PYTHON) bench/fid_bench.py
	$(PYTHON) bench/ddpm_bench.py --device cpu

clean-runs: ## delete run folders and smoke outputs (never results/)
	rm -rf runs smoke
