"""megalm: builds the extension megalm._C from csrc/ (C++ always; CUDA kernels when a CUDA torch and nvcc exist).

Install with ``pip install --no-build-isolation -e .`` after torch: with build isolation pip cannot see torch,
and the package then installs without the extension (every kernel has a PyTorch fallback).
"""
import glob
import os

from setuptools import Extension, find_packages, setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    torch = None
    print("megalm: torch is not importable at build time; installing without the megalm._C extension")

if torch is not None and os.environ.get("MEGALM_SKIP_EXTENSION") != "1":
    # csrc/tokenizer/ is its own module, megalm._bpe, which does not link torch: preprocessing workers that
    # import it start without paying for `import torch`
    cpp = sorted(p for p in glob.glob("csrc/**/*.cpp", recursive=True) if not p.startswith("csrc/tokenizer/"))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    cxx = ["-O3", "-std=c++17", "-fno-trapping-math"]  # lets GCC if-convert and vectorise the softmax loops
    if torch.version.cuda is not None and CUDA_HOME is not None and cu:
        ext = CUDAExtension("megalm._C", cpp + cu, define_macros=[("MEGALM_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]})
    else:
        ext = CppExtension("megalm._C", cpp, extra_compile_args=cxx)
    pybind11_include = [p for p in torch.utils.cpp_extension.include_paths() if os.path.isdir(p + "/pybind11")]
    bpe = Extension("megalm._bpe", ["csrc/tokenizer/byte_bpe.cpp"], include_dirs=pybind11_include,
                    language="c++", extra_compile_args=["-O3", "-std=c++17"])
    ext_modules = [ext, bpe]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="megalm",
    version="0.1.0",
    description="A Megatron-style trainer for GPT/Llama-class models on PyTorch",
    packages=find_packages(include=["megalm", "megalm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<3",  # 2.13.0 (CPU) is what CI installs first; GPU users keep their own build
        "numpy",
        "sentencepiece",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "jinja2>=3.1",  # chat templates (the sandboxed environment transformers renders them in)
    ],
    extras_require={"test": ["pytest", "megatron-core", "transformers", "safetensors", "tiktoken", "matplotlib",
                             "wandb", "torchao>=0.12", "peft", "trl"],  # peft, trl: LoRA's and DPO's peers
                    "fp8": ["torchao>=0.12"],  # --fp8-format: torchao's float8 training
                    "deepspeed": ["deepspeed>=0.14"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": [
        "megalm-preprocess=megalm.tools.preprocess_data:main",
        "megalm-pretrain=megalm.pretrain:main",
        "megalm-generate=megalm.generate:main",
        "megalm-export-hf=megalm.interop.hf:export_main",
        "megalm-estimate=megalm.tools.estimate:main",
        "megalm-import-hf=megalm.interop.hf:import_main",
        "megalm-import-megatron=megalm.interop.megatron:import_main",
        "megalm-export-megatron=megalm.interop.megatron:export_main",
        "megalm-build-corpus=megalm.tools.build_corpus:main",
        "megalm-train-tokenizer=megalm.tools.train_tokenizer:main",
        "megalm-merge-datasets=megalm.tools.merge_datasets:main",
        "megalm-plot=megalm.tools.plot:main",
    ]},
)
