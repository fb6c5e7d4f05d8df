"""The page: a Gradio app that runs the base and the merged model side by side. It wires controls to callbacks; the
merging, the checks of raw values and the retrieval prompts it shows live in the library (slerpviz), and it never
imports the benchmarks."""
