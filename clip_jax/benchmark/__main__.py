from clip_jax.benchmark.bench import main

main()
