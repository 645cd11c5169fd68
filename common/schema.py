"""Column names, defined once. Stage scripts use these constants, never string literals.

Stage 1 rows (one per candidate):  PROMPT_ID, PROMPT, SOURCE, REFERENCE, CANDIDATE, RESPONSE,
                                   NUM_PROMPT_TOKENS, NUM_RESPONSE_TOKENS, FINISH_REASON
Stage 2 rows (one per pair, TRL's conversational preference format):
                                   PROMPT_ID, PROMPT, CHOSEN, REJECTED, SOURCE, + score/length columns below
Stage 3 adds (TRL's names):        REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS
"""

PROMPT_ID = "prompt_id"  # stable id of a prompt (the data's id column, or a hash of the text)
PROMPT = "prompt"  # chat messages: list of {"role", "content"}
SOURCE = "source"  # the text the prompt was built from (what a judge checks faithfulness against)
REFERENCE = "reference"  # optional human reference (ACLSum's summary); "" when absent
CANDIDATE = "candidate_index"  # 0..n-1 within a prompt
RESPONSE = "response"  # generated text
NUM_PROMPT_TOKENS = "num_prompt_tokens"
NUM_RESPONSE_TOKENS = "num_response_tokens"
FINISH_REASON = "finish_reason"  # "stop" (eos or a stop string) or "length" (hit max_tokens)

# judge outputs (stage 2 and 4)
SCORE = "score"  # the judge's quality score of one response (higher is better)
NUM_WORDS = "num_words"
JUDGE_DETAIL = "judge_detail"  # JSON string: what the judge said (answers, raw text), for inspection

# preference pairs (stage 2 -> 3)
CHOSEN = "chosen"  # messages: [{"role": "assistant", "content": ...}]
REJECTED = "rejected"
CHOSEN_SCORE, REJECTED_SCORE = "chosen_score", "rejected_score"
CHOSEN_WORDS, REJECTED_WORDS = "chosen_words", "rejected_words"
PAIR_ID = "pair_id"

# reference log-probs (stage 3), TRL's names
REF_CHOSEN_LOGPS = "ref_chosen_logps"
REF_REJECTED_LOGPS = "ref_rejected_logps"

# stage 1's working columns (never written): the prompt's token ids for vLLM, and why a prompt was skipped
TOKENIZED = "tokenized_prompt"  # the column name ray.data.llm's vLLM stage reads
SKIP = "skip_reason"  # "" = generated

# stage 2's scored-candidates file and pairs
FILTER_REASON = "filter_reason"  # "" = kept, else the filter that removed the candidate
DECIDED_BY = "decided_by"  # "quality" or "length": which branch of the pairing rule made the pair
# stage 2's working columns (never written): common.per_prompt
PAIRABLE = "prompt_pairable"  # the candidate's prompt has two different texts left after the filters
PAIRS_JSON = "pairs_json"  # one prompt's pairs, JSON of TRL rows
HOLDOUT_RANK = "holdout_rank"  # orders the prompts with pairs for the validation holdout; -1 = no pairs

# stage 3's tokenised pairs (common.tokenize -> reference actors -> trainers)
PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS = "prompt_ids", "chosen_ids", "rejected_ids"
DROP_REASON = "drop_reason"  # "" = kept, else why the pair cannot be trained on
SHUFFLE_KEY = "shuffle_key"  # a seeded hash of the pair id: stage 3's fixed shuffle sorts on it
REF_CHOSEN_TOKENS, REF_REJECTED_TOKENS = "chosen_num_tokens", "rejected_num_tokens"
REF_PID = "ref_pid"  # which process computed a row's reference log-probs (the tests check it is not a trainer)

# stage 4's judged responses
SYSTEM = "model"  # which model (or outputs file) wrote the response; its name in the report
