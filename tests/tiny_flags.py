"""Gin flags of the tiny decoder-only LM that the CLI tests train (one copy for every test that runs it)."""

TINY = ['--gin.EMBED_DIM=32', '--gin.MLP_DIM=48', '--gin.NUM_HEADS=2', '--gin.HEAD_DIM=16',
        '--gin.NUM_EXPERTS=4', '--gin.EXPERT_MLP_DIM=32', '--gin.GROUP_SIZE=64']
LM = ['--gin_file=gin/models/st_moe_tiny.gin', '--gin_file=gin/runs/decoder_only.gin',
      '--gin.MIXTURE_OR_TASK_NAME="stdlib_lm"', "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
      '--gin.BATCH_SIZE=8', *TINY]
